/**
 * Target 1: safetensors headers. Valid headers are mutated (structure, text, bytes, the
 * length prefix, the file size) and parsed in-process: every call must return a header that
 * keeps the format's rules or throw the parser's domain error. A sample of the inputs is also
 * written to a file and registered through the API, which must agree with the parser.
 */
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  DTYPE_BITS,
  encodeHeader,
  type Header,
  MAX_HEADER_BYTES,
  parseHeader,
  SafetensorsError,
} from "../../daemon/checkpoints/safetensors.ts";
import { DaemonError } from "../../daemon/errors.ts";
import type { ChildDaemon } from "./daemon.ts";
import { FindingError } from "./findings.ts";
import { deepValue, hugeValue, mutateBytes, mutateValue, randomValue, stringify } from "./mutate.ts";
import type { Rng } from "./rng.ts";
import type { Target } from "./run.ts";

const DTYPES = Object.keys(DTYPE_BITS);
/** One input in this many is registered through the API too. */
const API_EVERY = 50;
/** A parse slower than this per MiB of header (at least 1 MiB) is a hang: parsing is linear in the header. */
const HANG_MS_PER_MIB = 1000;

interface Case {
  bytes: Uint8Array;
  fileSize: number;
}

/** A valid file: a header for 1..6 tensors laid out back to back, and its size. */
function validCase(rng: Rng): { header: Record<string, unknown>; dataBytes: number } {
  const drawn = Array.from({ length: rng.int(1, 6) }, (_, i) => {
    const dtype = rng.pick(DTYPES);
    const shape = Array.from({ length: rng.int(0, 3) }, () => rng.int(0, 6) * 2);
    return { name: `layer.${i}.${rng.pick(["weight", "bias", "é", "x"])}`, dtype, shape };
  });
  const header: Record<string, unknown> = {};
  if (rng.chance(0.3)) header.__metadata__ = { format: "pt" };
  let offset = 0;
  for (const t of drawn) {
    const bits = (dtype: string) => t.shape.reduce((a, d) => a * d, DTYPE_BITS[dtype] as number);
    const dtype = bits(t.dtype) % 8 === 0 ? t.dtype : "U8"; // 6-bit dtypes need a multiple of 4 elements
    const bytes = bits(dtype) / 8;
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  return { header, dataBytes: offset };
}

/** A mutation that knows the format: one field of one entry made wrong. */
function mutateEntry(header: Record<string, unknown>, rng: Rng): void {
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  const name = rng.pick(names);
  const entry = header[name] as Record<string, unknown>;
  const [b = 0, e = 0] = entry.data_offsets as number[];
  switch (rng.int(0, 9)) {
    case 0:
      entry.dtype = rng.pick([rng.pick(DTYPES).toLowerCase(), "F128", "", "toString", "__proto__", randomValue(rng)]);
      break;
    case 1:
      entry.shape = rng.pick([
        [-1],
        [0.5],
        [2 ** 53 + 2],
        [2 ** 40, 2 ** 40],
        ["2"],
        [null],
        [[1]],
        {},
        "1",
        [Number.POSITIVE_INFINITY],
      ]);
      break;
    case 2:
      entry.shape = [deepValue(rng, rng.chance(0.1) ? rng.int(5000, 50_000) : rng.int(10, 2000))];
      break;
    case 3:
      entry.shape = hugeValue(rng, rng.chance(0.1) ? 300_000 : 10_000);
      break;
    case 4:
      entry.data_offsets = rng.pick([
        [e, b],
        [b],
        [b, e, e],
        [b, e + 1],
        [b, 2 ** 53],
        [-1, e],
        [b + 0.5, e],
        ["0", e],
      ]);
      break;
    case 5:
      entry.data_offsets = [0, e - b]; // overlaps the first tensor
      break;
    case 6:
      entry[rng.pick(["extra", "__proto__", "offsets", "DTYPE"])] = randomValue(rng);
      break;
    case 7:
      header[name] = rng.pick([[], "F32", null, 1, deepValue(rng, rng.int(10, rng.chance(0.1) ? 20_000 : 1000))]);
      break;
    case 8:
      header[rng.pick(["", "__proto__", "constructor", "x".repeat(100_000)])] = entry;
      break;
    default:
      header.__metadata__ = rng.pick([
        { a: 1 },
        [],
        "pt",
        null,
        { a: deepValue(rng, 1000) },
        { a: "b".repeat(100_000) },
      ]);
  }
}

/** Many small tensors (a header of tens of thousands of entries). */
function manyTensors(rng: Rng): Record<string, unknown> {
  const n = rng.chance(0.1) ? rng.int(10_000, 50_000) : rng.int(100, 3000);
  const header: Record<string, unknown> = {};
  for (let i = 0; i < n; i++) header[`t${i}`] = { dtype: "U8", shape: [1], data_offsets: [i, i + 1] };
  return header;
}

/** Text-level damage a JSON writer never makes: duplicate keys, numbers beyond 2^53, a BOM, trailing bytes. */
function mutateText(text: string, rng: Rng): string {
  switch (rng.int(0, 6)) {
    case 0: {
      const first = /^\{("[^"]*":\{[^}]*\})/.exec(text)?.[1];
      return first ? `{${first},${text.slice(1)}` : text;
    }
    case 1:
      return text.replace(/\d+\]/, rng.pick(["9007199254740993]", "18446744073709551616]", "1e999]", "01]", "-0]"]));
    case 2:
      return `\ufeff${text}`;
    case 3:
      return `${text}${rng.pick(["}", "garbage", "\u0000", "{}", "/* */"])}`;
    case 4:
      return text.replace(/"dtype"/, rng.pick(['"dtype":"F32","dtype"', '"d\\u0074ype"', '"dtype\\u0000"']));
    case 5:
      return text.slice(0, rng.int(0, text.length));
    default:
      return text.replace(/:/g, rng.chance(0.5) ? " : " : "\t:\n");
  }
}

/** Puts JSON text behind an 8-byte length, which may be made wrong. */
function frame(json: Uint8Array, rng: Rng, wrongLength: boolean): Uint8Array {
  const out = new Uint8Array(8 + json.byteLength);
  out.set(json, 8);
  let len = BigInt(json.byteLength);
  if (wrongLength) {
    len = rng.pick([
      0n,
      1n,
      2n,
      len - 1n,
      len + 1n,
      len + 8n,
      BigInt(MAX_HEADER_BYTES),
      BigInt(MAX_HEADER_BYTES) + 1n,
      2n ** 53n + 1n,
      2n ** 63n,
      2n ** 64n - 1n,
    ]);
    if (len < 0n) len = 0n;
  }
  new DataView(out.buffer).setBigUint64(0, len, true);
  return out;
}

/** One input: bytes and the file size given with them. */
export function makeCase(rng: Rng): Case {
  const { header, dataBytes } = validCase(rng);
  let value: unknown = header;
  const kind = rng.int(0, 9);
  if (kind <= 3) mutateEntry(header, rng);
  else if (kind === 4) value = mutateValue(header, rng);
  else if (kind === 5)
    value = rng.pick([
      [],
      "x",
      1,
      null,
      deepValue(rng, rng.chance(0.1) ? rng.int(10_000, 100_000) : rng.int(10, 1000)),
      manyTensors(rng),
    ]);
  let text = stringify(value);
  if (kind === 6) text = mutateText(text, rng);
  let json: Uint8Array = new TextEncoder().encode(text);
  if (kind === 7) json = mutateBytes(json, rng);
  let bytes = frame(json, rng, kind === 8 || rng.chance(0.05));
  if (kind === 9) bytes = bytes.subarray(0, rng.int(0, bytes.length));
  const exact = 8 + json.byteLength + dataBytes;
  const fileSize = rng.chance(0.85)
    ? exact
    : rng.pick([0, 7, 8, bytes.length, exact - 1, exact + 1, 2 ** 53 - 1, 2 ** 40, rng.int(0, exact)]);
  if (rng.chance(0.02)) return { bytes: encodeHeader([{ name: "w", dtype: "F32", shape: [1], bytes: 4 }]), fileSize };
  return { bytes, fileSize };
}

/** The format's rules a header the parser accepted must keep; the first one broken, or undefined. */
export function brokenRule(h: Header, prefix: Uint8Array, fileSize: number): string | undefined {
  const len = Number(new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true));
  if (h.dataStart !== 8 + len) return `dataStart ${h.dataStart} is not 8 + ${len}`;
  const names = new Set<string>();
  let reach = h.dataStart;
  for (const t of h.tensors) {
    if (names.has(t.name)) return `tensor "${t.name}" twice`;
    names.add(t.name);
    if (!Object.hasOwn(DTYPE_BITS, t.dtype)) return `tensor "${t.name}" has dtype ${t.dtype}`;
    if (!(t.begin >= h.dataStart && t.begin <= t.end && t.end <= fileSize))
      return `tensor "${t.name}" lies outside the data`;
    const bits = t.shape.reduce((a, d) => a * BigInt(d), BigInt(DTYPE_BITS[t.dtype] as number));
    if (bits !== BigInt(t.end - t.begin) * 8n) return `tensor "${t.name}" has ${t.end - t.begin} bytes for its shape`;
    if (t.end > t.begin && t.begin < reach) return `tensor "${t.name}" overlaps another`;
    if (t.end > t.begin) reach = t.end;
  }
  return undefined;
}

/** Parses in-process; the header, the domain error, or a finding (anything else thrown, a rule broken, a hang). */
export function parseChecked(c: Case): Header | SafetensorsError | DaemonError {
  const t0 = performance.now();
  let out: Header | SafetensorsError | DaemonError;
  try {
    out = parseHeader(c.bytes, c.fileSize, "fuzz.safetensors");
  } catch (err) {
    if (!(err instanceof SafetensorsError || err instanceof DaemonError)) {
      const e = err as Error;
      throw new FindingError(
        `parseHeader threw ${e?.name}: ${String(e?.message).slice(0, 160)} (fileSize ${c.fileSize})`,
        c.bytes,
      );
    }
    out = err;
  }
  const ms = performance.now() - t0;
  if (ms > HANG_MS_PER_MIB * Math.max(1, c.bytes.byteLength / 2 ** 20))
    throw new FindingError(`parseHeader took ${ms.toFixed(0)} ms (fileSize ${c.fileSize})`, c.bytes);
  if (!(out instanceof Error)) {
    const broken = brokenRule(out, c.bytes, c.fileSize);
    if (broken) throw new FindingError(`parseHeader accepted a header that breaks a rule: ${broken}`, c.bytes);
  }
  return out;
}

/** Registers the case as a file through the API; the answer must agree with the in-process parse. */
async function viaApi(daemon: ChildDaemon, c: Case, index: number): Promise<void> {
  const size = c.fileSize >= c.bytes.length && c.fileSize - c.bytes.length <= 8 << 20 ? c.fileSize : c.bytes.length;
  const file = new Uint8Array(size);
  file.set(c.bytes);
  const local = parseChecked({ bytes: file, fileSize: size });
  const path = join(daemon.roots, `st-${index}.safetensors`);
  writeFileSync(path, file);
  try {
    const a = await daemon.call({
      method: "POST",
      path: "/v1/checkpoints",
      headers: { authorization: `Bearer ${daemon.adminToken}`, "content-type": "application/json" },
      body: new TextEncoder().encode(JSON.stringify({ name: `st-${index}`, files: [path] })),
    });
    const want = local instanceof Error ? 400 : 201;
    if (a.status !== want) {
      throw new FindingError(
        `registering the file answered ${a.status} (the parser says ${want}): ${a.body.toString().slice(0, 300)}`,
        c.bytes,
      );
    }
  } catch (err) {
    if (err instanceof FindingError) throw err;
    throw new FindingError(`registering the file: ${(err as Error).message}`, c.bytes);
  } finally {
    await daemon
      .call({
        method: "DELETE",
        path: `/v1/checkpoints/st-${index}`,
        headers: { authorization: `Bearer ${daemon.adminToken}` },
      })
      .catch(() => undefined);
    rmSync(path, { force: true });
  }
}

export function safetensorsTarget(daemon: ChildDaemon): Target {
  return {
    name: "safetensors",
    concurrency: 2,
    async one(rng, index) {
      const c = makeCase(rng);
      parseChecked(c);
      if (index % API_EVERY === 0) await viaApi(daemon, c, index);
    },
  };
}
