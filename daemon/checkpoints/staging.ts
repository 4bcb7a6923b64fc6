/**
 * Staging areas: a trainer writes its tensors straight into a file that the daemon laid out as
 * safetensors in the upload directory (it maps the file; no byte goes through HTTP), then
 * commits. The commit copies the file into pooled pinned memory and hashes every tensor, and
 * that copy is the new version: the daemon's own memory, which no later write to the file can
 * reach. The area stays, for the next step's tensors, until it is deleted; its file is the
 * daemon's (mode 0600, or 0660 for the upload group, whose members may then write it).
 */
import { randomBytes } from "node:crypto";
import { chown, unlink } from "node:fs/promises";
import { join } from "node:path";
import { DaemonError } from "../errors.ts";
import type { Group } from "./confine.ts";
import { layOut, type Placed, sized, type TensorDeclaration, writeLayout } from "./declared.ts";
import { type CheckpointVersion, checkName, type Registry } from "./registry.ts";
import { resolveFiles } from "./sources.ts";

export interface StagingRequest {
  name: string;
  tensors: TensorDeclaration[];
  metadata?: Record<string, string>;
}

interface Area {
  id: string;
  name: string;
  path: string;
  size: number;
  tensors: Placed[];
  /** Versions committed from it, the last one's id. */
  commits: number;
  last?: string;
  busy: boolean;
}

function summary(a: Area) {
  return {
    id: a.id,
    name: a.name,
    path: a.path,
    bytes: a.size,
    tensors: a.tensors.map(({ name, dtype, shape, offset, bytes }) => ({ name, dtype, shape, offset, bytes })),
    commits: a.commits,
    ...(a.last ? { lastVersion: a.last } : {}),
  };
}

export class StagingAreas {
  private readonly areas = new Map<string, Area>();

  constructor(
    private readonly registry: Registry,
    private readonly dir: string,
    private readonly group?: Group,
  ) {}

  list(): ReturnType<typeof summary>[] {
    return [...this.areas.values()].map(summary);
  }

  /**
   * Lays the tensors out in a new file, and has the pool keep two pinned blocks of its size
   * ready (budget permitting): the next commit's, and the one after it, while the version it
   * replaces is still kept. With maxVersions 1, no commit pins fresh memory from then on.
   */
  async create(req: StagingRequest): Promise<ReturnType<typeof summary>> {
    checkName(req.name);
    const declared = sized(req.tensors);
    const layout = layOut(declared, req.metadata, "the staging area");
    // The file takes memory on tmpfs as it fills, and each commit pins as much.
    this.registry.checkBudget(layout.size, "a staging area of");
    const id = randomBytes(8).toString("hex");
    const path = join(this.dir, `${id}-staging.safetensors`);
    await writeLayout(path, layout, this.group ? 0o660 : 0o600);
    try {
      if (this.group) await chown(path, -1, this.group.gid);
      await this.registry.stock(layout.size, 2);
    } catch (err) {
      await unlink(path).catch(() => undefined);
      throw err;
    }
    const area: Area = {
      id,
      name: req.name,
      path,
      size: layout.size,
      tensors: layout.tensors,
      commits: 0,
      busy: false,
    };
    this.areas.set(id, area);
    return summary(area);
  }

  /**
   * Registers a copy of the area's file as the next version of its checkpoint, and returns it
   * ready (copied and hashed) or throws why not. The trainer may write the next step's tensors
   * once this returns; writes while it runs may be in the version or not.
   */
  async commit(id: string): Promise<CheckpointVersion> {
    const area = this.get(id);
    area.busy = true;
    try {
      const version = await this.registry.register({
        name: area.name,
        source: resolveFiles([area.path]),
        copy: true,
        adopt: false,
        origin: "staged",
      });
      await version.finished();
      area.commits++;
      area.last = version.id;
      return version;
    } finally {
      area.busy = false;
    }
  }

  /** Forgets an area and deletes its file (its committed versions stay). */
  async delete(id: string): Promise<string> {
    const area = this.get(id);
    this.areas.delete(id);
    await unlink(area.path).catch(() => undefined);
    return id;
  }

  /** Deletes every area's file, committing or not (shutdown: areas do not outlive the daemon). */
  async close(): Promise<void> {
    const areas = [...this.areas.values()];
    this.areas.clear();
    for (const a of areas) await unlink(a.path).catch(() => undefined);
  }

  /** The area, if it exists and is not committing (404 / 409 otherwise). */
  get(id: string): Area {
    const a = this.areas.get(id);
    if (!a) throw new DaemonError("not_found", `no staging area ${id}`);
    if (a.busy) throw new DaemonError("busy", `staging area ${id} is busy with a commit`);
    return a;
  }
}
