import { describe, expect, it } from "vitest";
import { CheckpointVersion, type FileRecord, type TensorRecord } from "../checkpoints/registry.ts";
import { fingerprint, withFingerprint } from "./fingerprint.ts";

const tensor = (o: Partial<TensorRecord> = {}): TensorRecord => ({
  name: "w",
  dtype: "F32",
  shape: [4, 4],
  bytes: 64,
  file: 0,
  offset: 8,
  hash: "0123456789abcdef",
  ...o,
});

/** A version of `name` (number `n`) with one file per size and the given tensors. */
function version(
  o: { name?: string; n?: number; state?: CheckpointVersion["state"]; sizes?: number[]; tensors?: TensorRecord[] } = {},
) {
  const v = new CheckpointVersion(o.name ?? "m", o.n ?? 1, 72, "2026-01-01T00:00:00.000Z");
  v.state = o.state ?? "ready";
  v.files = (o.sizes ?? [72]).map((size, i) => ({ path: `/x/${o.n ?? 1}/${i}`, size }) as FileRecord);
  v.tensors = o.tensors ?? [tensor()];
  return v;
}

describe("fingerprint", () => {
  it("is the same for the same contents whatever the version number or file paths", () => {
    expect(fingerprint(version({ n: 1 }))).toBe(fingerprint(version({ n: 7 })));
    expect(fingerprint(version())).toMatch(/^[0-9a-f]{64}$/);
  });

  it.each([
    { name: "a file's size", o: { sizes: [80] } },
    { name: "another file", o: { sizes: [72, 0] } },
    { name: "a tensor's name", o: { tensors: [tensor({ name: "v" })] } },
    { name: "a tensor's dtype", o: { tensors: [tensor({ dtype: "BF16" })] } },
    { name: "a tensor's shape", o: { tensors: [tensor({ shape: [2, 8] })] } },
    { name: "a tensor's offset", o: { tensors: [tensor({ offset: 0 })] } },
    { name: "a tensor's file", o: { tensors: [tensor({ file: 1 })] } },
    { name: "a tensor's hash", o: { tensors: [tensor({ hash: "fedcba9876543210" })] } },
    { name: "another tensor", o: { tensors: [tensor(), tensor({ name: "b", offset: 72 })] } },
  ])("changes with $name", ({ o }) => {
    expect(fingerprint(version(o))).not.toBe(fingerprint(version()));
  });

  it("of a version still registering follows its tensors as they are hashed", () => {
    const v = version({ state: "registering", tensors: [tensor({ hash: "" })] });
    const before = fingerprint(v);
    (v.tensors[0] as TensorRecord).hash = "0123456789abcdef";
    v.state = "ready";
    expect(fingerprint(v)).not.toBe(before);
    expect(fingerprint(v)).toBe(fingerprint(version()));
  });
});

describe("withFingerprint", () => {
  const fp = fingerprint(version());
  it("finds the ready version of that name with that content", () => {
    const other = version({ n: 1, tensors: [tensor({ hash: "1111111111111111" })] });
    const same = version({ n: 2 });
    expect(withFingerprint([other, same], "m", fp)).toBe(same);
  });

  it.each([
    { name: "another name", versions: () => [version({ name: "n" })], name_: "m", fp },
    { name: "a version not ready", versions: () => [version({ state: "stale" })], name_: "m", fp },
    { name: "a version still registering", versions: () => [version({ state: "registering" })], name_: "m", fp },
    { name: "other contents", versions: () => [version({ sizes: [1] })], name_: "m", fp },
    { name: "no name asked", versions: () => [version()], name_: undefined, fp },
    { name: "no fingerprint asked", versions: () => [version()], name_: "m", fp: undefined },
  ])("finds nothing with $name", ({ versions, name_, fp }) => {
    expect(withFingerprint(versions(), name_, fp)).toBeUndefined();
  });
});
