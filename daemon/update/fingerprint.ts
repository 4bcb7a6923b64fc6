/** Fingerprints: how daemons tell that they hold the same checkpoint, whatever its version number. */
import { createHash } from "node:crypto";
import type { CheckpointVersion, TensorRecord } from "../checkpoints/registry.ts";

const fingerprints = new WeakMap<CheckpointVersion, string>();

/** Identifies a version's exact contents and layout, whatever its number on each daemon. */
export function fingerprint(v: CheckpointVersion): string {
  // A ready version never changes, so its fingerprint is computed once.
  const known = v.state === "ready" ? fingerprints.get(v) : undefined;
  if (known) return known;
  const fp = fingerprintOf(
    v.files.map((f) => f.size),
    v.tensors,
  );
  if (v.state === "ready") fingerprints.set(v, fp);
  return fp;
}

/** The fingerprint of files of these sizes holding these tensors: pure. */
export function fingerprintOf(sizes: readonly number[], tensors: readonly TensorRecord[]): string {
  const h = createHash("sha256");
  h.update(JSON.stringify(sizes));
  for (const t of tensors) h.update(JSON.stringify([t.name, t.dtype, t.shape, t.bytes, t.file, t.offset, t.hash]));
  return h.digest("hex");
}

/** The engines' weight version after an update: the checkpoint's name@N and its fingerprint's first 16 digits. */
export function weightVersion(id: string, fp: string): string {
  return `${id}+${fp.slice(0, 16)}`;
}

/** The ready version of `name` with fingerprint `fp` among `versions`, if any. */
export function withFingerprint(versions: CheckpointVersion[], name: string | undefined, fp: string | undefined) {
  return versions.find((v) => v.name === name && v.state === "ready" && fingerprint(v) === fp);
}
