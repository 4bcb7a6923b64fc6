/** Small generated safetensors checkpoints for tests, with the bytes to check against. */
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import xxhash from "xxhash-wasm";
import { DTYPE_BITS, encodeHeader } from "../daemon/checkpoints/safetensors.ts";

export interface TensorSpec {
  name: string;
  dtype: string;
  shape: number[];
}

export interface WrittenTensor extends TensorSpec {
  bytes: Uint8Array;
  file: string;
}

export function tensorBytes(t: TensorSpec): number {
  return (t.shape.reduce((a, d) => a * d, 1) * (DTYPE_BITS[t.dtype] as number)) / 8;
}

/** A whole file for any header, valid or not: its JSON as given, then `dataBytes` zero bytes. */
export function safetensorsBytes(header: unknown, dataBytes: number): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.byteLength + dataBytes);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  out.set(json, 8);
  return out;
}

/** Writes one safetensors file of random contents; returns its tensors with their bytes. */
export function writeSafetensors(path: string, tensors: TensorSpec[]): WrittenTensor[] {
  const withBytes = tensors.map((t) => ({ ...t, bytes: randomBytes(tensorBytes(t)) }));
  const header = encodeHeader(withBytes.map((t) => ({ ...t, bytes: t.bytes.byteLength })));
  writeFileSync(path, Buffer.concat([header, ...withBytes.map((t) => t.bytes)]));
  return withBytes.map((t) => ({ ...t, file: path }));
}

/** A safetensors file of these tensors with these bytes (another version of a model, say). */
export function writeTensors(path: string, tensors: (TensorSpec & { bytes: Uint8Array })[]): WrittenTensor[] {
  const header = encodeHeader(tensors.map((t) => ({ ...t, bytes: t.bytes.byteLength })));
  writeFileSync(path, Buffer.concat([header, ...tensors.map((t) => t.bytes)]));
  return tensors.map((t) => ({ ...t, file: path }));
}

/** A small model-like checkpoint split over `files` files in `dir`. */
export function writeModel(dir: string, files = 2, layers = 3, hidden = 64): WrittenTensor[] {
  const specs: TensorSpec[] = [{ name: "model.embed_tokens.weight", dtype: "BF16", shape: [100, hidden] }];
  for (let l = 0; l < layers; l++) {
    specs.push({ name: `model.layers.${l}.mlp.up_proj.weight`, dtype: "BF16", shape: [hidden * 2, hidden] });
    specs.push({ name: `model.layers.${l}.input_layernorm.weight`, dtype: "F32", shape: [hidden] });
  }
  specs.push({ name: "lm_head.weight", dtype: "BF16", shape: [100, hidden] });
  const out: WrittenTensor[] = [];
  for (let f = 0; f < files; f++) {
    const mine = specs.filter((_, i) => i % files === f);
    out.push(...writeSafetensors(join(dir, `model-${f + 1}-of-${files}.safetensors`), mine));
  }
  return out;
}

let hasher: Awaited<ReturnType<typeof xxhash>> | undefined;

/**
 * The ckpt hash (cuda-lib/include/ckpt.h: XXH64 of each 64 KiB, then XXH64 of those hashes as
 * little-endian uint64s) as 16 hex digits, from an XXH64 independent of libckpt.
 */
export async function ckptHash(bytes: Uint8Array): Promise<string> {
  hasher ??= await xxhash();
  const chunk = 1 << 16;
  const chunks = new DataView(new ArrayBuffer(8 * Math.ceil(bytes.byteLength / chunk)));
  for (let at = 0; at < bytes.byteLength; at += chunk) {
    chunks.setBigUint64((at / chunk) * 8, hasher.h64Raw(bytes.subarray(at, at + chunk)), true);
  }
  return hasher.h64Raw(new Uint8Array(chunks.buffer)).toString(16).padStart(16, "0");
}
