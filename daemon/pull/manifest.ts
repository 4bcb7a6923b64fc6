/**
 * What a source tells a puller (POST /v1/peer/pull, signed both ways): the version's layout
 * and hashes, the bytes between its tensors with theirs, and where and how to fetch each file
 * over UCX. The puller trusts none of it beyond the fingerprint it asked for: the manifest
 * must hash to that fingerprint and cover every byte of every file (checkManifest).
 */
import * as v from "valibot";
import type { TensorRecord } from "../checkpoints/registry.ts";
import { DaemonError } from "../errors.ts";
import { fingerprintOf } from "../update/fingerprint.ts";
import { type Piece, tilingError } from "./stripe.ts";

const count = v.pipe(v.number(), v.integer(), v.minValue(0));
const hex16 = v.pipe(v.string(), v.regex(/^[0-9a-f]{16}$/));
/** A piece of memory's UCX region on each lane: its id (decimal) and key (32 hex digits). */
const laneRegions = v.pipe(
  v.array(
    v.object({ id: v.pipe(v.string(), v.regex(/^\d{1,20}$/)), key: v.pipe(v.string(), v.regex(/^[0-9a-f]{32}$/)) }),
  ),
  v.minLength(1),
  v.maxLength(16),
);

export const ManifestSchema = v.object({
  nodeId: v.pipe(v.string(), v.maxLength(200)),
  name: v.pipe(v.string(), v.maxLength(200)),
  version: count,
  fingerprint: v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/)),
  /** Where the source's UCX lanes listen: "host:port" each. */
  addresses: v.pipe(v.array(v.pipe(v.string(), v.maxLength(300))), v.minLength(1), v.maxLength(16)),
  files: v.pipe(
    v.array(
      v.object({
        size: count,
        regions: laneRegions,
      }),
    ),
    v.minLength(1),
    v.maxLength(100_000),
  ),
  tensors: v.pipe(
    v.array(
      v.object({
        name: v.pipe(v.string(), v.maxLength(1000)),
        dtype: v.pipe(v.string(), v.maxLength(20)),
        shape: v.pipe(v.array(count), v.maxLength(16)),
        bytes: count,
        file: count,
        offset: count,
        hash: hex16,
      }),
    ),
    v.maxLength(10_000_000),
  ),
  /** The bytes no tensor covers (headers, padding), with their ckpt hash. */
  gaps: v.array(v.object({ file: count, begin: count, end: count, hash: hex16 })),
  /**
   * The version's deltas against the one before it, where the source made them: a puller that
   * holds a tensor of hash `from` fetches `bytes` at `offset` of the deltas' region (its new
   * values at `values`, uint32 positions at `positions`, `count` of each) instead of the tensor.
   */
  deltas: v.optional(
    v.object({
      regions: laneRegions,
      tensors: v.pipe(
        v.array(
          v.object({
            name: v.pipe(v.string(), v.maxLength(1000)),
            from: hex16,
            count: v.pipe(count, v.minValue(1)),
            offset: count,
            bytes: count,
            positions: count,
            values: count,
          }),
        ),
        v.maxLength(10_000_000),
      ),
    }),
  ),
});

export type Manifest = v.InferOutput<typeof ManifestSchema>;

/** Every byte of the version as pieces to verify: tensors, then the gaps. */
export function piecesOf(m: Pick<Manifest, "tensors" | "gaps">): Piece[] {
  return [
    ...m.tensors.map((t) => ({ name: t.name, file: t.file, begin: t.offset, end: t.offset + t.bytes, hash: t.hash })),
    ...m.gaps.map((g) => ({ name: `bytes ${g.begin}..${g.end} of file ${g.file}`, ...g })),
  ];
}

/** A source's answer as a manifest of `fingerprint`, or why it is not one. */
export function checkManifest(body: unknown, fingerprint: string): Manifest {
  const parsed = v.safeParse(ManifestSchema, body);
  if (!parsed.success)
    throw new DaemonError("bad_answer", `not a pull manifest: ${v.summarize(parsed.issues).slice(0, 300)}`);
  const m = parsed.output;
  if (m.files.some((f) => f.regions.length !== m.addresses.length)) {
    throw new DaemonError(
      "bad_answer",
      `the manifest of ${m.name}@${m.version} gives a region per lane for some files only`,
    );
  }
  if (m.deltas && m.deltas.regions.length !== m.addresses.length) {
    throw new DaemonError(
      "bad_answer",
      `the manifest of ${m.name}@${m.version} gives its deltas a region on some lanes only`,
    );
  }
  const sizes = m.files.map((f) => f.size);
  if (m.fingerprint !== fingerprint || fingerprintOf(sizes, m.tensors as TensorRecord[]) !== fingerprint) {
    throw new DaemonError(
      "bad_answer",
      `the manifest of ${m.name}@${m.version} is not that of fingerprint ${fingerprint.slice(0, 16)}`,
    );
  }
  const why = tilingError(sizes, piecesOf(m));
  if (why)
    throw new DaemonError("bad_answer", `the manifest of ${m.name}@${m.version} does not cover its files: ${why}`);
  return m;
}
