/**
 * safetensors headers: an 8-byte little-endian length, then that many bytes of JSON mapping
 * tensor names to {dtype, shape, data_offsets}, then the data. Parsing is pure and strict:
 * every rule broken is reported with the file, the tensor and the rule.
 */
import { preview } from "../errors.ts";

/** Bits per element of every dtype of the format. */
export const DTYPE_BITS: Record<string, number> = {
  BOOL: 8,
  F4: 4,
  F6_E2M3: 6,
  F6_E3M2: 6,
  U8: 8,
  I8: 8,
  F8_E5M2: 8,
  F8_E4M3: 8,
  F8_E8M0: 8,
  I16: 16,
  U16: 16,
  F16: 16,
  BF16: 16,
  I32: 32,
  U32: 32,
  F32: 32,
  C64: 64,
  F64: 64,
  I64: 64,
  U64: 64,
};

/** The format's own cap on the header length. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export interface TensorEntry {
  name: string;
  dtype: string;
  shape: number[];
  /** Byte offsets in the file (not in the data section). */
  begin: number;
  end: number;
}

export interface Header {
  /** Bytes before the data section: 8 + the header length. */
  dataStart: number;
  tensors: TensorEntry[];
  metadata: Record<string, string>;
}

/** A rule of the format broken by a file: says which file, which tensor and which rule. */
export class SafetensorsError extends Error {
  constructor(
    readonly file: string,
    readonly tensor: string | undefined,
    readonly rule: string,
  ) {
    super(`${file}: ${tensor === undefined ? "" : `tensor "${tensor}": `}${rule}`);
    this.name = "SafetensorsError";
  }
}

/** Reads the header length from the first 8 bytes; checks it against the bound and the file size. */
export function headerLength(prefix: Uint8Array, fileSize: number, file: string): number {
  if (fileSize < 8 || prefix.byteLength < 8) {
    throw new SafetensorsError(file, undefined, `file of ${fileSize} bytes is too short for a header length`);
  }
  // The length is not echoed, nor anything else read from the file: the daemon may read
  // files its caller cannot (registering /etc/shadow must not answer with its first bytes).
  const len = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (len < 2n || len > BigInt(MAX_HEADER_BYTES)) {
    throw new SafetensorsError(file, undefined, `header length (the first 8 bytes) is outside 2..${MAX_HEADER_BYTES}`);
  }
  if (len > BigInt(fileSize - 8)) {
    throw new SafetensorsError(
      file,
      undefined,
      `header length (the first 8 bytes) exceeds the file of ${fileSize} bytes`,
    );
  }
  return Number(len);
}

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

function checkEntry(file: string, name: string, raw: unknown, dataStart: number, fileSize: number): TensorEntry {
  const fail = (rule: string): never => {
    throw new SafetensorsError(file, name, rule);
  };
  if (name.length === 0) fail("empty tensor name");
  if (!isObject(raw)) return fail("entry is not an object");
  for (const key of Object.keys(raw)) {
    if (key !== "dtype" && key !== "shape" && key !== "data_offsets") fail(`unknown field "${key}"`);
  }
  const { dtype, shape, data_offsets: offsets } = raw;
  // An own property: "toString" or "__proto__" are in every object, and are no dtype.
  if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BITS, dtype)) {
    fail(`dtype ${preview(dtype)} is not one of ${Object.keys(DTYPE_BITS).join(", ")}`);
  }
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    fail(`shape ${preview(shape)} is not a list of non-negative integers`);
  }
  if (
    !Array.isArray(offsets) ||
    offsets.length !== 2 ||
    !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) ||
    offsets[0] > offsets[1]
  ) {
    fail(`data_offsets ${preview(offsets)} is not [begin, end] with 0 <= begin <= end`);
  }
  const [begin, end] = offsets as [number, number];
  const bits = (shape as number[]).reduce((acc, d) => acc * BigInt(d), BigInt(DTYPE_BITS[dtype as string] as number));
  if (bits % 8n !== 0n) fail(`shape ${preview(shape)} of ${dtype} is not a whole number of bytes`);
  if (bits / 8n !== BigInt(end - begin)) {
    fail(`shape ${preview(shape)} of ${dtype} needs ${bits / 8n} bytes but data_offsets span ${end - begin}`);
  }
  if (dataStart + end > fileSize) {
    fail(`data_offsets [${begin}, ${end}] run past the end of the file (${fileSize - dataStart} data bytes)`);
  }
  return { name, dtype: dtype as string, shape: shape as number[], begin: dataStart + begin, end: dataStart + end };
}

/**
 * Parses and checks a header. `bytes` holds the file's first 8 + length bytes; fileSize is
 * the whole file's size. Throws SafetensorsError on any broken rule.
 */
export function parseHeader(bytes: Uint8Array, fileSize: number, file: string): Header {
  const len = headerLength(bytes, fileSize, file);
  if (bytes.byteLength < 8 + len) throw new SafetensorsError(file, undefined, "header is truncated");
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + len)));
  } catch {
    // The parser's message quotes the text around the error: not echoed (see headerLength).
    throw new SafetensorsError(file, undefined, "header is not valid UTF-8 JSON");
  }
  if (!isObject(json)) throw new SafetensorsError(file, undefined, "header is not a JSON object");
  const dataStart = 8 + len;
  const tensors: TensorEntry[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(json)) {
    if (name === "__metadata__") {
      if (!isObject(raw) || !Object.values(raw).every((x) => typeof x === "string")) {
        throw new SafetensorsError(file, undefined, "__metadata__ is not an object of strings");
      }
      metadata = raw as Record<string, string>;
    } else {
      tensors.push(checkEntry(file, name, raw, dataStart, fileSize));
    }
  }
  tensors.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let last: TensorEntry | undefined; // the non-empty tensor reaching furthest so far
  for (const cur of tensors) {
    if (cur.end === cur.begin) continue;
    if (last && cur.begin < last.end) {
      throw new SafetensorsError(file, cur.name, `bytes overlap those of tensor "${last.name}"`);
    }
    last = cur;
  }
  return { dataStart, tensors, metadata };
}

/** Checks that no tensor name appears in two files of one checkpoint. */
export function checkUniqueNames(files: { file: string; tensors: { name: string }[] }[]): void {
  const seen = new Map<string, string>();
  for (const { file, tensors } of files) {
    for (const { name } of tensors) {
      const other = seen.get(name);
      if (other !== undefined) throw new SafetensorsError(file, name, `also defined in ${other}`);
      seen.set(name, file);
    }
  }
}

/** Serializes a header for the given tensors laid out back to back (for writers and tests). */
export function encodeHeader(
  tensors: { name: string; dtype: string; shape: number[]; bytes: number }[],
  metadata?: Record<string, string>,
): Uint8Array {
  // No prototype: a tensor named "__proto__" is a key like any other.
  const obj: Record<string, unknown> = Object.create(null);
  if (metadata) obj.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    obj[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes] };
    offset += t.bytes;
  }
  const json = new TextEncoder().encode(JSON.stringify(obj));
  const pad = (8 - (json.byteLength % 8)) % 8; // data starts 8-byte aligned
  const body = new Uint8Array(json.byteLength + pad).fill(0x20);
  body.set(json);
  const out = new Uint8Array(8 + body.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(body.byteLength), true);
  out.set(body, 8);
  return out;
}
