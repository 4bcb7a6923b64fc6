/**
 * Trainers push checkpoints over HTTP: declare tensors and send each one's raw bytes, or send
 * whole safetensors files; then commit. Bytes land in files under uploadDir (tmpfs by
 * default), which the committed version adopts and pins in place.
 */
import { randomBytes } from "node:crypto";
import { type FileHandle, mkdir, open, stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { DaemonError } from "../errors.ts";
import { layOut, sized, type TensorDeclaration, writeLayout } from "./declared.ts";
import { type CheckpointVersion, checkName, type Registry } from "./registry.ts";
import { resolveFiles } from "./sources.ts";

export interface UploadRequest {
  name: string;
  tensors: TensorDeclaration[];
  metadata?: Record<string, string>;
}

/** Where a declared tensor's bytes go in the upload's tensors file, and whether they are all in. */
interface Placement {
  offset: number;
  bytes: number;
  written: boolean;
}

interface Upload {
  id: string;
  name: string;
  /** Declared tensors, laid out in `tensorsFile`. */
  placements: Map<string, Placement>;
  tensorsFile?: string;
  /** Whole safetensors files received, by file name. */
  files: Map<string, string>;
  busy: boolean;
}

/** A request body, as the runtime hands it over. */
export type Body = ReadableStream<Uint8Array> | null;

const FILE_NAME = /^[A-Za-z0-9._-]+\.safetensors$/;

/** Streams a body into a file at `position`; returns the bytes written, or `limit + 1` if it held more. */
async function streamTo(body: Body, file: FileHandle, position: number, limit: number): Promise<number> {
  if (!body) return 0;
  let written = 0;
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (written + value.byteLength > limit) {
      // Released, not cancelled: cancelling resets the connection, and the client may lose the
      // answer; the server discards what is still coming (bounded) before it closes.
      reader.releaseLock();
      return limit + 1;
    }
    try {
      await file.write(value, 0, value.byteLength, position + written);
    } catch (err) {
      reader.releaseLock(); // as above: the client still gets the answer
      throw err;
    }
    written += value.byteLength;
  }
  return written;
}

function summary(u: Upload) {
  return {
    id: u.id,
    name: u.name,
    tensors: [...u.placements].map(([name, p]) => ({ name, bytes: p.bytes, written: p.written })),
    files: [...u.files.keys()],
  };
}

/** Uploads in progress: one request at a time per upload, until committed or deleted. */
export class Uploads {
  private readonly uploads = new Map<string, Upload>();

  constructor(
    private readonly registry: Registry,
    private readonly dir: string,
  ) {}

  list(): ReturnType<typeof summary>[] {
    return [...this.uploads.values()].map(summary);
  }

  /** Starts an upload; declared tensors get their places in one file, laid out back to back. */
  async create(req: UploadRequest): Promise<ReturnType<typeof summary>> {
    checkName(req.name);
    const declared = req.tensors.length > 0 ? sized(req.tensors) : [];
    // Refused now rather than at commit: staging files on tmpfs take memory as they fill.
    this.registry.checkBudget(
      declared.reduce((sum, t) => sum + t.bytes, 0),
      "declaring tensors of",
    );
    const layout = declared.length > 0 ? layOut(declared, req.metadata, "the upload") : undefined;
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const id = randomBytes(8).toString("hex");
    const upload: Upload = { id, name: req.name, placements: new Map(), files: new Map(), busy: false };
    if (layout) {
      const path = join(this.dir, `${id}-tensors.safetensors`);
      await writeLayout(path, layout, 0o600);
      for (const t of layout.tensors)
        upload.placements.set(t.name, { offset: t.offset, bytes: t.bytes, written: false });
      upload.tensorsFile = path;
    }
    this.uploads.set(id, upload);
    return summary(upload);
  }

  /** Writes one declared tensor's bytes; anything but exactly its size leaves it unwritten. */
  async putTensor(id: string, name: string, body: Body): Promise<{ name: string; bytes: number }> {
    const upload = this.get(id);
    const place = upload.placements.get(name);
    const path = upload.tensorsFile;
    if (!place || !path) throw new DaemonError("not_found", `upload ${upload.id} declares no tensor "${name}"`);
    return this.exclusive(upload, async () => {
      const file = await open(path, "r+");
      place.written = false; // until the new bytes are all in
      try {
        const n = await streamTo(body, file, place.offset, place.bytes);
        place.written = n === place.bytes;
        if (!place.written) {
          throw new DaemonError(
            "wrong_size",
            `tensor "${name}" needs exactly ${place.bytes} bytes, got ${n > place.bytes ? "more" : n}`,
          );
        }
      } catch (err) {
        throw this.full(err, `tensor "${name}" (not written; the upload keeps its staging file)`);
      } finally {
        await file.close();
      }
      return { name, bytes: place.bytes };
    });
  }

  /**
   * Receives a whole safetensors file (checked at commit, like any registered file). One larger
   * than the pinned-memory budget leaves (by its Content-Length, or as it streams) is a 413, and
   * none of it is kept.
   */
  async putFile(
    id: string,
    name: string,
    body: Body,
    declaredBytes?: number,
  ): Promise<{ file: string; bytes: number }> {
    const upload = this.get(id);
    if (!FILE_NAME.test(name)) {
      throw new DaemonError("invalid_request", `file name "${name}" must be a plain name ending in .safetensors`);
    }
    const path = join(this.dir, `${upload.id}-${name}`);
    return this.exclusive(upload, async () => {
      const limit = Math.min(Number.MAX_SAFE_INTEGER, this.registry.budgetLeft() - (await this.staged(upload, name)));
      const tooLarge = () =>
        new DaemonError(
          "body_too_large",
          `file "${name}" exceeds the ${limit} bytes the pinned-memory budget leaves (pinnedBudgetBytes); nothing was kept`,
          { limitBytes: limit },
        );
      if ((declaredBytes ?? 0) > limit) throw tooLarge();
      // A new file, never one found there ("wx" follows no symlink): with uploadGroup, others
      // may create names in the directory.
      await unlink(path).catch(() => undefined);
      const file = await open(path, "wx", 0o600);
      let n: number;
      try {
        n = await streamTo(body, file, 0, Math.max(0, limit));
        if (n > limit) throw tooLarge();
      } catch (err) {
        await file.close();
        await unlink(path).catch(() => undefined);
        throw this.full(err, `file "${name}" (nothing of it was kept)`);
      }
      await file.close();
      upload.files.set(name, path);
      return { file: name, bytes: n };
    });
  }

  /** A write that found the upload directory full, as a 507 naming it; other errors as they are. */
  private full(err: unknown, what: string): unknown {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== "ENOSPC" && code !== "EDQUOT") return err;
    return new DaemonError(
      "upload_dir_full",
      `the upload directory ${this.dir} is full (${code}) while writing ${what}; free space there or delete uploads in progress`,
    );
  }

  /** Bytes the upload's staging files hold, but for the file `except` (about to be replaced). */
  private async staged(u: Upload, except: string): Promise<number> {
    const paths = [u.tensorsFile, ...[...u.files].filter(([n]) => n !== except).map(([, p]) => p)];
    let sum = 0;
    for (const p of paths) if (p) sum += (await stat(p)).size;
    return sum;
  }

  /** Registers what was uploaded as the next version, which adopts the files; the upload ends. */
  async commit(id: string): Promise<CheckpointVersion> {
    const upload = this.get(id);
    const missing = [...upload.placements].filter(([, p]) => !p.written).map(([n]) => n);
    if (missing.length > 0) {
      throw new DaemonError("incomplete", `tensors not uploaded yet: ${missing.slice(0, 10).join(", ")}`, {
        missing,
      });
    }
    const files = [...(upload.tensorsFile ? [upload.tensorsFile] : []), ...upload.files.values()];
    if (files.length === 0) throw new DaemonError("incomplete", `upload ${upload.id} holds no tensors or files`);
    const version = await this.exclusive(upload, () =>
      this.registry.register({ name: upload.name, source: resolveFiles(files), copy: false, adopt: true }),
    );
    this.uploads.delete(upload.id); // the version owns the files now
    return version;
  }

  /** Forgets an upload and deletes its files. */
  async delete(id: string): Promise<string> {
    const upload = this.get(id);
    this.uploads.delete(upload.id);
    for (const path of [upload.tensorsFile, ...upload.files.values()]) {
      if (path) await unlink(path).catch(() => undefined);
    }
    return upload.id;
  }

  /** The upload, if it exists and no other request holds it (404 / 409 otherwise). */
  get(id: string): Upload {
    const u = this.uploads.get(id);
    if (!u) throw new DaemonError("not_found", `no upload ${id}`);
    if (u.busy) throw new DaemonError("busy", `upload ${id} is busy with another request`);
    return u;
  }

  private async exclusive<T>(u: Upload, fn: () => Promise<T>): Promise<T> {
    u.busy = true;
    try {
      return await fn();
    } finally {
      u.busy = false;
    }
  }
}
