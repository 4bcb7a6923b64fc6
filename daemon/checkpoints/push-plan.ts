/**
 * What a push from GPUs makes (device-push.ts): where each pushed tensor lands in the version's
 * block, checked against its buffer and device, the tensors a push on a base copies from it,
 * and the copies in batches. Pure.
 */
import { DaemonError } from "../errors.ts";
import { layOut, type Placed, sized, type TensorDeclaration } from "./declared.ts";
import type { CheckpointVersion } from "./registry.ts";

/** A piece of device memory of the trainer's: its IPC handle, as ckpt_ipc_handle holds it. */
export interface PushBuffer {
  kind: "cuda" | "host";
  /** The device's UUID ("GPU-..." as nvidia-smi -L says; the host backend's "HOST-..."). */
  device: string;
  /** Bytes of the allocation the handle maps, from its start. */
  len: number;
  pid: number;
  /** The handle's bytes, base64: a cudaIpcMemHandle_t, or a "/proc/<pid>/fd/<n>" path. */
  handle: string;
}

export interface PushRequest {
  name: string;
  metadata?: Record<string, string>;
  buffers: PushBuffer[];
  /** Each tensor: which buffer holds it, and where (bytes from the buffer's start). */
  tensors: (TensorDeclaration & { buffer: number; offset: number })[];
  /** "name@N": the version is that one with the pushed tensors replaced (the others copied from it). */
  base?: string;
}

/** A base version's tensor that a push copies rather than pushes: where it lands, where it is. */
interface FromBase {
  tensor: Placed;
  /** Its bytes in the base's pinned memory. */
  src: bigint;
  hash: string;
}

/** Copies to queue between two events (the progress moves, and the timeout counts, per batch). */
const BATCH_BYTES = 256 << 20;

const normalUuid = (uuid: string) => uuid.toLowerCase().replace(/^gpu-/, "");

/**
 * What a push on `base` makes: the base's tensors in its order, each pushed one in its place
 * (same dtype and shape: a 400 naming it otherwise, or if the base has no such tensor).
 */
function onBase(req: PushRequest, base: CheckpointVersion): TensorDeclaration[] {
  const pushed = new Map(req.tensors.map((t) => [t.name, t]));
  const names = new Set(base.tensors.map((t) => t.name));
  for (const t of req.tensors) {
    if (!names.has(t.name))
      throw new DaemonError("invalid_request", `tensor "${t.name}" is not in the base ${base.id}`);
  }
  return base.tensors.map((b) => {
    const t = pushed.get(b.name);
    if (t && (t.dtype !== b.dtype || t.shape.join(",") !== b.shape.join(","))) {
      throw new DaemonError(
        "invalid_request",
        `tensor "${t.name}" is ${t.dtype} [${t.shape}] where the base ${base.id} has ${b.dtype} [${b.shape}]: push it whole, without a base`,
      );
    }
    return { name: b.name, dtype: b.dtype, shape: b.shape };
  });
}

/** Where each tensor lands in the version's block, checked against its buffer; a 400 names what is wrong. */
export function planPush(req: PushRequest, devices: { uuid: string }[], base?: CheckpointVersion) {
  sized(req.tensors); // each named once
  const declared = sized(base ? onBase(req, base) : req.tensors);
  const layout = layOut(declared, req.metadata, "the push");
  const placedAs = new Map(layout.tensors.map((t) => [t.name, t]));
  const deviceOf = req.buffers.map((b, i) => {
    // A CUDA handle is 64 bytes; a host one a NUL-terminated path: either fits in 128.
    const handleBytes = Buffer.from(b.handle, "base64").byteLength;
    if (handleBytes > 128) {
      throw new DaemonError("invalid_request", `buffer ${i}: a handle is at most 128 bytes, not ${handleBytes}`);
    }
    const k = devices.findIndex((d) => normalUuid(d.uuid) === normalUuid(b.device));
    if (k < 0) {
      throw new DaemonError(
        "invalid_request",
        `buffer ${i} is on device ${b.device}, which this daemon does not have (it has ${devices.map((d) => d.uuid).join(", ")})`,
      );
    }
    return k;
  });
  const copies = req.tensors.map((t) => {
    const buf = req.buffers[t.buffer];
    const placed = placedAs.get(t.name) as Placed;
    if (!buf)
      throw new DaemonError("invalid_request", `tensor "${t.name}" names buffer ${t.buffer}, which is not given`);
    if (t.offset + placed.bytes > buf.len) {
      throw new DaemonError(
        "invalid_request",
        `tensor "${t.name}" (${placed.bytes} bytes at offset ${t.offset}) does not fit in buffer ${t.buffer} of ${buf.len} bytes`,
      );
    }
    return { tensor: placed, buffer: t.buffer, device: deviceOf[t.buffer] as number, from: t.offset };
  });
  const pushed = new Set(req.tensors.map((t) => t.name));
  const fromBase: FromBase[] = (base?.tensors ?? [])
    .filter((b) => !pushed.has(b.name))
    .map((b) => ({
      tensor: placedAs.get(b.name) as Placed,
      src: (base?.pinned[b.file]?.mem.address as bigint) + BigInt(b.offset),
      hash: b.hash,
    }));
  // A base pinned where its files lie could have changed since it was hashed: its copies are hashed again.
  const trusted = base?.files.every((f) => !f.inPlace) ?? true;
  return { layout, copies, deviceOf, fromBase, trusted };
}

export type Copy = ReturnType<typeof planPush>["copies"][number];

/** Copies of one device, about BATCH_BYTES a batch, in layout order. */
export function batches(copies: Copy[]): Copy[][] {
  const out: Copy[][] = [];
  const open = new Map<number, { batch: Copy[]; bytes: number }>();
  for (const c of copies) {
    let current = open.get(c.device);
    if (!current || current.bytes >= BATCH_BYTES) {
      current = { batch: [], bytes: 0 };
      open.set(c.device, current);
      out.push(current.batch);
    }
    current.batch.push(c);
    current.bytes += c.tensor.bytes;
  }
  return out;
}
