/**
 * Grammar-based mutation of JSON-like values (wrong types, missing and extra keys, huge
 * strings and arrays, deep nesting, odd numbers and strings), and byte-level mutation of their
 * encodings (flips, truncations, invalid UTF-8, CBOR tags).
 */
import { encode as encodeCbor } from "cbor-x";
import type { Rng } from "./rng.ts";

const STRINGS = [
  "",
  " ",
  "\u0000",
  "a\u0000b",
  "\ud800",
  "é",
  "💥",
  "__proto__",
  "constructor",
  "toString",
  "__metadata__",
  "../../../etc/passwd",
  "/etc/shadow",
  "/",
  ".",
  "..",
  "/dev/zero",
  "/proc/self/mem",
  "x@0",
  "x@1",
  "x@99999999999",
  "x@-1",
  "@",
  "name@",
  "%00",
  "%2e%2e%2f",
  "F32",
  "BF16",
  "f32",
  "a".repeat(256),
  "model.safetensors",
  "\n",
  "\r\n",
  "$\u007bx}",
];

const NUMBERS = [
  0,
  -0,
  1,
  -1,
  2,
  7,
  255,
  65536,
  2 ** 31,
  2 ** 32,
  2 ** 53 - 1,
  2 ** 53,
  2 ** 53 + 2,
  2 ** 63,
  2 ** 64,
  1e308,
  -1e308,
  0.5,
  -0.5,
  1e-320,
  Number.MAX_VALUE,
];

/** A value of any JSON type, small, or sometimes huge or deep. */
export function randomValue(rng: Rng, depth = 0): unknown {
  if (rng.chance(0.02)) return hugeValue(rng);
  if (rng.chance(0.02)) return deepValue(rng, rng.int(10, rng.chance(0.1) ? 100_000 : 2000));
  switch (rng.int(0, depth > 2 ? 5 : 7)) {
    case 0:
      return null;
    case 1:
      return rng.chance(0.5);
    case 2:
      return rng.pick(NUMBERS);
    case 3:
      return rng.pick(STRINGS);
    case 4:
      return rng.int(-1000, 1000);
    case 5:
      return rng.hex(rng.int(0, 40));
    case 6:
      return Array.from({ length: rng.int(0, 4) }, () => randomValue(rng, depth + 1));
    case 7:
      return Object.fromEntries(
        Array.from({ length: rng.int(0, 4) }, () => [randomKey(rng), randomValue(rng, depth + 1)]),
      );
    case 8:
      return hugeValue(rng);
    default:
      return deepValue(rng, rng.int(10, rng.chance(0.1) ? 100_000 : 2000));
  }
}

function randomKey(rng: Rng): string {
  return rng.chance(0.5) ? rng.pick(STRINGS) : rng.hex(rng.int(1, 12));
}

/** A long string or a long array (up to `max` elements or characters). */
export function hugeValue(rng: Rng, max = 100_000): unknown {
  const n = rng.chance(0.2) ? rng.int(1000, max) : rng.int(100, 5000);
  if (rng.chance(0.5)) return rng.pick(["a", "é", "\u0000", "💥"]).repeat(n);
  return Array.from({ length: n }, (_, i) => (rng.chance(0.5) ? i : 0));
}

/** Nested arrays or objects `depth` levels deep. */
export function deepValue(rng: Rng, depth: number): unknown {
  const objects = rng.chance(0.5);
  let v: unknown = rng.chance(0.5) ? 1 : [];
  for (let i = 0; i < depth; i++) v = objects ? { a: v } : [v];
  return v;
}

/**
 * A copy of `value` with 1..3 mutations at random places: a node replaced by a value of
 * another type, a key dropped, a key added, a string or array made huge, a node nested deep.
 */
export function mutateValue(value: unknown, rng: Rng): unknown {
  let out = structuredClone(value);
  const times = rng.int(1, 3);
  for (let i = 0; i < times; i++) out = mutateOnce(out, rng);
  return out;
}

function mutateOnce(value: unknown, rng: Rng, depth = 0): unknown {
  if (depth > 16) return randomValue(rng); // a deep value made by an earlier mutation
  if (Array.isArray(value)) {
    if (value.length > 0 && rng.chance(0.7)) {
      const at = rng.int(0, value.length - 1);
      value[at] = mutateOnce(value[at], rng, depth + 1);
      return value;
    }
    return rng.pick([() => [...value, randomValue(rng)], () => value.slice(1), () => [], () => randomValue(rng)])();
  }
  if (value !== null && typeof value === "object") {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj);
    if (keys.length > 0 && rng.chance(0.6)) {
      const key = rng.pick(keys);
      obj[key] = mutateOnce(obj[key], rng, depth + 1);
      return obj;
    }
    return rng.pick([
      () => {
        if (keys.length) delete obj[rng.pick(keys)];
        return obj;
      },
      () => {
        Object.defineProperty(obj, randomKey(rng), {
          value: randomValue(rng),
          enumerable: true,
          writable: true,
          configurable: true,
        });
        return obj;
      },
      () => randomValue(rng),
    ])();
  }
  if (typeof value === "string" && rng.chance(0.3)) return value + rng.pick(STRINGS);
  if (typeof value === "number" && rng.chance(0.4)) return rng.pick(NUMBERS) * rng.pick([1, -1]);
  return randomValue(rng);
}

/** Byte-level damage: flips, truncation, invalid UTF-8, insertions. */
export function mutateBytes(bytes: Uint8Array, rng: Rng): Uint8Array {
  const out = Array.from(bytes);
  const times = rng.int(1, 4);
  for (let i = 0; i < times; i++) {
    const at = rng.int(0, Math.max(0, out.length - 1));
    switch (rng.int(0, 5)) {
      case 0:
        out[at] = (out[at] ?? 0) ^ (1 << rng.int(0, 7));
        break;
      case 1:
        out.length = rng.int(0, out.length);
        break;
      case 2:
        out.splice(
          at,
          0,
          ...rng.pick([[0xff], [0xc3], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xc0, 0xaf]]),
        );
        break;
      case 3:
        out.splice(at, rng.int(1, 8));
        break;
      case 4:
        out.splice(at, 0, ...rng.bytes(rng.int(1, 16)));
        break;
      default:
        out[at] = rng.int(0, 255);
    }
  }
  return Uint8Array.from(out);
}

/** JSON text of a value: the one a client would send (deep values are written without recursion). */
export function jsonBytes(value: unknown): Uint8Array {
  return new TextEncoder().encode(stringify(value));
}

/** JSON.stringify, or for values too deep for it, the same text written with an explicit stack. */
export function stringify(value: unknown): string {
  try {
    return JSON.stringify(value) ?? "null";
  } catch {
    return stringifyDeep(value);
  }
}

interface Frame {
  close: string;
  entries: [string | undefined, unknown][];
  at: number;
}

function stringifyDeep(value: unknown): string {
  const out: string[] = [];
  const stack: Frame[] = [];
  const open = (v: unknown): void => {
    if (Array.isArray(v)) {
      out.push("[");
      stack.push({ close: "]", entries: v.map((x) => [undefined, x]), at: 0 });
    } else if (v !== null && typeof v === "object") {
      out.push("{");
      stack.push({ close: "}", entries: Object.entries(v), at: 0 });
    } else out.push(JSON.stringify(v) ?? "null");
  };
  open(value);
  for (let f = stack.at(-1); f; f = stack.at(-1)) {
    const entry = f.entries[f.at++];
    if (!entry) {
      out.push(f.close);
      stack.pop();
      continue;
    }
    if (f.at > 1) out.push(",");
    if (entry[0] !== undefined) out.push(`${JSON.stringify(entry[0])}:`);
    open(entry[1]);
  }
  return out.join("");
}

/** CBOR of a value, damaged at times: truncated, wrapped in a tag, or given a deep prefix. */
export function cborBytes(value: unknown, rng: Rng): Uint8Array {
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(encodeCbor(value));
  } catch {
    bytes = jsonBytes(value);
  }
  switch (rng.int(0, 7)) {
    case 0:
      return bytes.subarray(0, rng.int(0, bytes.length));
    case 1:
      return Uint8Array.from([...cborTag(rng), ...bytes]);
    case 2:
      return Uint8Array.from([...new Array(rng.int(100, 100_000)).fill(0x81), 0x00]);
    case 3:
      // a length far beyond the bytes that follow
      return Uint8Array.from([
        rng.pick([0x5b, 0x7b, 0x9b, 0xbb]),
        0x7f,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0x00,
      ]);
    case 4:
      return mutateBytes(bytes, rng);
    default:
      return bytes;
  }
}

/** A CBOR tag head: a registered tag (dates, bignums, typed arrays, sets, shared refs, cbor-x records) or any. */
function cborTag(rng: Rng): number[] {
  const tag = rng.pick([
    0,
    1,
    2,
    3,
    4,
    5,
    21,
    24,
    25,
    27,
    28,
    29,
    32,
    35,
    64,
    65,
    72,
    81,
    86,
    258,
    259,
    0xe000,
    rng.int(0, 0xffff),
  ]);
  if (tag < 24) return [0xc0 | tag];
  if (tag < 256) return [0xd8, tag];
  return [0xd9, tag >> 8, tag & 0xff];
}

/** encodeURIComponent, with a lone surrogate written as the bytes a lax encoder would send. */
export function percentEncoded(text: string): string {
  return text.replace(/[^A-Za-z0-9_.~-]/gsu, (c) => {
    try {
      return encodeURIComponent(c);
    } catch {
      return "%ED%A0%80";
    }
  });
}
