/** The registry's metadata on disk, and its restoration at start. */
import { readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "pino";
import type { FileRecord, Registry, TensorRecord } from "./registry.ts";

interface SavedVersion {
  name: string;
  version: number;
  createdAt: string;
  files: FileRecord[];
  tensors: TensorRecord[];
}

/**
 * 3: tensor hashes are ckpt hashes (ckpt.h) of 64 KiB chunks. 2 (chunks of 1 MiB) and 1 (plain
 * XXH64) are hashes this daemon no longer computes: such a version is restored when its files
 * are unchanged (size, modification time) and its hashes are computed anew, not compared.
 */
const FORMAT = 3;

interface Saved {
  format: 1 | 2 | 3;
  next: Record<string, number>;
  versions: SavedVersion[];
  /** Versions still registering at the save: reported at the next start if never saved ready. */
  registering?: string[];
}

export interface RestoreReport {
  restored: string[];
  notRestored: { id: string; reason: string }[];
}

export function registryFile(stateDir: string): string {
  return join(stateDir, "registry.json");
}

let saving: Promise<void> = Promise.resolve();

/** Writes the ready versions atomically (temp file, then rename), one save at a time. */
export function saveRegistry(stateDir: string, registry: Registry): Promise<void> {
  const next = saving.then(() => writeRegistry(stateDir, registry));
  saving = next.catch(() => undefined);
  return next;
}

async function writeRegistry(stateDir: string, registry: Registry): Promise<void> {
  const saved: Saved = {
    format: FORMAT,
    next: registry.nextVersions(),
    versions: registry
      .list()
      .filter((v) => v.state === "ready" && v.origin === "files")
      .map((v) => ({ name: v.name, version: v.version, createdAt: v.createdAt, files: v.files, tensors: v.tensors })),
    registering: registry
      .list()
      .filter((v) => v.state === "registering" && v.origin === "files")
      .map((v) => v.id),
  };
  const path = registryFile(stateDir);
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, JSON.stringify(saved), { mode: 0o600 });
  await rename(tmp, path);
}

/**
 * Re-registers what the state directory lists, when each file is still there with the same
 * size and modification time and every tensor still has its hash; reports the rest and why.
 */
export async function restoreRegistry(stateDir: string, registry: Registry, log: Logger): Promise<RestoreReport> {
  const report: RestoreReport = { restored: [], notRestored: [] };
  let saved: Saved;
  try {
    saved = JSON.parse(await readFile(registryFile(stateDir), "utf8"));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
      log.error({ err }, "registry.json unreadable; starting with an empty registry");
      report.notRestored.push({ id: "*", reason: `registry.json unreadable: ${(err as Error).message}` });
    }
    return report;
  }
  registry.setNextVersions(saved.next ?? {});
  for (const v of saved.versions ?? []) {
    const id = `${v.name}@${v.version}`;
    try {
      const version = await registry.register({
        name: v.name,
        source: { files: v.files.map((f) => f.path) },
        // A copy was asked for when no file is in place (a file off tmpfs is copied anyway).
        copy: v.files.every((f) => !f.inPlace),
        adopt: v.files.some((f) => f.adopted),
        restore: saved.format === FORMAT ? v : { ...v, tensors: undefined },
      });
      await version.done;
      if (version.state !== "ready") throw new Error(version.error?.message ?? version.state);
      report.restored.push(id);
    } catch (err) {
      report.notRestored.push({ id, reason: (err as Error).message });
    }
  }
  for (const id of saved.registering ?? []) {
    report.notRestored.push({ id, reason: "its registration was cut off when the daemon stopped; register it again" });
  }
  for (const entry of report.notRestored) log.warn(entry, "checkpoint not restored");
  if (report.restored.length > 0) log.info({ restored: report.restored }, "checkpoints restored");
  return report;
}
