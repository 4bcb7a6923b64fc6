/**
 * Declared tensors laid out as one safetensors file: the header, then each tensor's bytes
 * back to back in the order declared. Uploads and staging areas both place a trainer's
 * tensors this way before any byte arrives.
 */
import { open, unlink } from "node:fs/promises";
import { DaemonError } from "../errors.ts";
import { DTYPE_BITS, encodeHeader } from "./safetensors.ts";

export interface TensorDeclaration {
  name: string;
  dtype: string;
  shape: number[];
}

/** A declared tensor's place in the file: its first byte and its size. */
export interface Placed extends TensorDeclaration {
  offset: number;
  bytes: number;
}

export interface Layout {
  header: Uint8Array;
  tensors: Placed[];
  /** The whole file's size. */
  size: number;
}

function bytesOf(dtype: string, shape: number[]): number {
  const bits = shape.reduce((a, d) => a * BigInt(d), BigInt(DTYPE_BITS[dtype] as number));
  if (bits % 8n !== 0n)
    throw new DaemonError("invalid_request", `shape ${JSON.stringify(shape)} of ${dtype} is not whole bytes`);
  return safeBytes(bits / 8n, `shape ${JSON.stringify(shape)} of ${dtype}`);
}

/** A byte count as a number, when it is one exactly (at most 2^53 - 1); else a 400 naming what. */
function safeBytes(bytes: bigint, what: string): number {
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new DaemonError("invalid_request", `${what} is ${bytes} bytes, more than 2^53 - 1`);
  }
  return Number(bytes);
}

/** The declared tensors with their sizes (at least one, names unique, whole bytes each); a 400 names what is wrong. */
export function sized(tensors: TensorDeclaration[]): (TensorDeclaration & { bytes: number })[] {
  if (tensors.length === 0) throw new DaemonError("invalid_request", "no tensors are declared");
  const seen = new Set<string>();
  return tensors.map((t) => {
    if (seen.has(t.name)) throw new DaemonError("invalid_request", `tensor "${t.name}" is declared twice`);
    seen.add(t.name);
    return { ...t, bytes: bytesOf(t.dtype, t.shape) };
  });
}

/** Lays out sized tensors in one file; `what` names it when it would pass 2^53 - 1 bytes. */
export function layOut(
  tensors: (TensorDeclaration & { bytes: number })[],
  metadata: Record<string, string> | undefined,
  what: string,
): Layout {
  const header = encodeHeader(tensors, metadata);
  const total = tensors.reduce((sum, t) => sum + BigInt(t.bytes), BigInt(header.byteLength));
  let offset = header.byteLength;
  const placed = tensors.map((t) => {
    const p = { ...t, offset };
    offset += t.bytes;
    return p;
  });
  return { header, tensors: placed, size: safeBytes(total, what) };
}

/** Makes a new file at `path` (none may be there) holding a layout's header, at its full size. */
export async function writeLayout(path: string, layout: Layout, mode: number): Promise<void> {
  const file = await open(path, "wx", mode);
  try {
    await file.write(layout.header, 0, layout.header.byteLength, 0);
    await file.truncate(layout.size);
  } catch (err) {
    await file.close();
    await unlink(path).catch(() => undefined); // no one owns the file yet: nothing may stay behind
    throw err;
  }
  await file.close();
}
