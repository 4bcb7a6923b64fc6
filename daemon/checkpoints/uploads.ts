/**
 * Trainers push checkpoints over HTTP: declare tensors and PUT each one's raw bytes, or PUT
 * whole safetensors files; then commit. Bytes land in files under uploadDir (tmpfs by
 * default), which the committed version adopts and pins in place.
 */
import { randomBytes } from "node:crypto";
import { mkdirSync } from "node:fs";
import { type FileHandle, open, unlink } from "node:fs/promises";
import { join } from "node:path";
import type { Context, Hono } from "hono";
import * as v from "valibot";
import { DaemonError } from "../errors.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import { checkName, type Registry } from "./registry.ts";
import { finished } from "./routes.ts";
import { DTYPE_BITS, encodeHeader } from "./safetensors.ts";
import { resolveFiles } from "./sources.ts";

const TensorDecl = v.strictObject({
  name: v.pipe(v.string(), v.minLength(1)),
  dtype: v.picklist(Object.keys(DTYPE_BITS)),
  shape: v.array(v.pipe(v.number(), v.integer(), v.minValue(0))),
});

const CreateBody = v.strictObject({
  name: v.string(),
  tensors: v.optional(v.array(TensorDecl), []),
  metadata: v.optional(v.record(v.string(), v.string())),
});

const CommitBody = v.optional(v.strictObject({ wait: v.optional(v.boolean(), true) }), {});

interface Slot {
  offset: number;
  bytes: number;
  written: boolean;
}

interface Upload {
  id: string;
  name: string;
  /** Declared tensors, laid out in `tensorsFile`. */
  slots: Map<string, Slot>;
  tensorsFile?: string;
  /** Whole safetensors files received, by file name. */
  files: Map<string, string>;
  busy: boolean;
}

function bytesOf(dtype: string, shape: number[]): number {
  const bits = shape.reduce((a, d) => a * BigInt(d), BigInt(DTYPE_BITS[dtype] as number));
  if (bits % 8n !== 0n)
    throw new DaemonError("invalid_request", `shape ${JSON.stringify(shape)} of ${dtype} is not whole bytes`);
  return Number(bits / 8n);
}

/** Streams a request body into a file at `position`; returns the bytes written (at most `limit`). */
async function streamTo(c: Context, file: FileHandle, position: number, limit: number): Promise<number> {
  const body = c.req.raw.body;
  if (!body) return 0;
  let written = 0;
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (written + value.byteLength > limit) {
      await reader.cancel();
      return limit + 1;
    }
    await file.write(value, 0, value.byteLength, position + written);
    written += value.byteLength;
  }
  return written;
}

function summary(u: Upload) {
  return {
    id: u.id,
    name: u.name,
    tensors: [...u.slots].map(([name, s]) => ({ name, bytes: s.bytes, written: s.written })),
    files: [...u.files.keys()],
  };
}

/** POST /v1/uploads, PUT .../tensors/{name}, PUT .../files/{name}, POST .../commit, DELETE. */
export function uploadRoutes(app: Hono<{ Variables: { body: unknown } }>, registry: Registry, uploadDir: string) {
  const uploads = new Map<string, Upload>();

  const get = (id: string): Upload => {
    const u = uploads.get(id);
    if (!u) throw new DaemonError("not_found", `no upload ${id}`);
    if (u.busy) throw new DaemonError("busy", `upload ${id} is busy with another request`);
    return u;
  };
  const exclusive = async <T>(u: Upload, fn: () => Promise<T>): Promise<T> => {
    u.busy = true;
    try {
      return await fn();
    } finally {
      u.busy = false;
    }
  };

  app.get("/v1/uploads", (c) => reply(c, { uploads: [...uploads.values()].map(summary) }));

  app.post("/v1/uploads", async (c) => {
    const body = parseBody(CreateBody, c.get("body"));
    checkName(body.name);
    const seen = new Set<string>();
    const layout = body.tensors.map((t) => {
      if (seen.has(t.name)) throw new DaemonError("invalid_request", `tensor "${t.name}" is declared twice`);
      seen.add(t.name);
      return { ...t, bytes: bytesOf(t.dtype, t.shape) };
    });
    mkdirSync(uploadDir, { recursive: true, mode: 0o700 });
    const id = randomBytes(8).toString("hex");
    const upload: Upload = { id, name: body.name, slots: new Map(), files: new Map(), busy: false };
    if (layout.length > 0) {
      const header = encodeHeader(layout, body.metadata);
      const path = join(uploadDir, `${id}-tensors.safetensors`);
      const file = await open(path, "wx", 0o600);
      try {
        await file.write(header, 0, header.byteLength, 0);
        let offset = header.byteLength;
        for (const t of layout) {
          upload.slots.set(t.name, { offset, bytes: t.bytes, written: false });
          offset += t.bytes;
        }
        await file.truncate(offset);
      } finally {
        await file.close();
      }
      upload.tensorsFile = path;
    }
    uploads.set(id, upload);
    return reply(c, summary(upload), 201);
  });

  app.put("/v1/uploads/:id/tensors/:tensor{.+}", async (c) => {
    const upload = get(c.req.param("id"));
    const name = c.req.param("tensor");
    const slot = upload.slots.get(name);
    if (!slot || !upload.tensorsFile)
      throw new DaemonError("not_found", `upload ${upload.id} declares no tensor "${name}"`);
    const path = upload.tensorsFile;
    return exclusive(upload, async () => {
      const file = await open(path, "r+");
      slot.written = false; // until the new bytes are all in
      try {
        const n = await streamTo(c, file, slot.offset, slot.bytes);
        slot.written = n === slot.bytes;
        if (!slot.written) {
          throw new DaemonError(
            "wrong_size",
            `tensor "${name}" needs exactly ${slot.bytes} bytes, got ${n > slot.bytes ? "more" : n}`,
          );
        }
      } finally {
        await file.close();
      }
      return reply(c, { name, bytes: slot.bytes });
    });
  });

  app.put("/v1/uploads/:id/files/:file", async (c) => {
    const upload = get(c.req.param("id"));
    const name = c.req.param("file");
    if (!/^[A-Za-z0-9._-]+\.safetensors$/.test(name)) {
      throw new DaemonError("invalid_request", `file name "${name}" must be a plain name ending in .safetensors`);
    }
    const path = join(uploadDir, `${upload.id}-${name}`);
    return exclusive(upload, async () => {
      const file = await open(path, "w", 0o600);
      let n: number;
      try {
        n = await streamTo(c, file, 0, Number.MAX_SAFE_INTEGER);
      } catch (err) {
        await file.close();
        await unlink(path).catch(() => undefined);
        throw err;
      }
      await file.close();
      upload.files.set(name, path);
      return reply(c, { file: name, bytes: n });
    });
  });

  app.post("/v1/uploads/:id/commit", async (c) => {
    const upload = get(c.req.param("id"));
    const body = parseBody(CommitBody, c.get("body"));
    const missing = [...upload.slots].filter(([, s]) => !s.written).map(([n]) => n);
    if (missing.length > 0) {
      throw new DaemonError("incomplete", `tensors not uploaded yet: ${missing.slice(0, 10).join(", ")}`, {
        missing,
      });
    }
    const files = [...(upload.tensorsFile ? [upload.tensorsFile] : []), ...upload.files.values()];
    if (files.length === 0) throw new DaemonError("incomplete", `upload ${upload.id} holds no tensors or files`);
    const version = await exclusive(upload, () =>
      registry.register({ name: upload.name, source: resolveFiles(files), copy: false, adopt: true }),
    );
    uploads.delete(upload.id); // the version owns the files now
    c.header("location", `/v1/checkpoints/${version.id}`);
    if (!body.wait) return reply(c, version.summary(), 202);
    await version.done;
    const { status, body: out } = finished(version);
    return reply(c, out, status);
  });

  app.delete("/v1/uploads/:id", async (c) => {
    const upload = get(c.req.param("id"));
    uploads.delete(upload.id);
    for (const path of [upload.tensorsFile, ...upload.files.values()]) {
      if (path) await unlink(path).catch(() => undefined);
    }
    return reply(c, { deleted: upload.id });
  });
}
