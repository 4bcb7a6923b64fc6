import { describe, expect, it } from "vitest";
import type { TensorRecord } from "../checkpoints/registry.ts";
import { fingerprintOf } from "../update/fingerprint.ts";
import { checkManifest, piecesOf } from "./manifest.ts";

const tensors: TensorRecord[] = [
  { name: "a", dtype: "BF16", shape: [4], bytes: 8, file: 0, offset: 16, hash: "1".repeat(16) },
  { name: "b", dtype: "BF16", shape: [8], bytes: 16, file: 0, offset: 24, hash: "2".repeat(16) },
];
const files = [{ size: 40, regions: [{ id: "7", key: "ab".repeat(16) }] }];
const fp = fingerprintOf([40], tensors);
const manifest = {
  nodeId: "src",
  name: "m",
  version: 3,
  fingerprint: fp,
  addresses: ["10.0.0.2:4000"],
  files,
  tensors,
  gaps: [{ file: 0, begin: 0, end: 16, hash: "3".repeat(16) }],
};

describe("checkManifest", () => {
  it("accepts a manifest of the fingerprint asked for that covers every byte", () => {
    expect(checkManifest(manifest, fp)).toEqual(manifest);
    expect(piecesOf(manifest).map((p) => [p.name, p.begin, p.end])).toEqual([
      ["a", 16, 24],
      ["b", 24, 40],
      ["bytes 0..16 of file 0", 0, 16],
    ]);
  });
  it("refuses one whose tensors do not hash to the fingerprint, whatever it claims", () => {
    const lying = { ...manifest, tensors: [tensors[0], { ...tensors[1], hash: "9".repeat(16) }] };
    expect(() => checkManifest(lying, fp)).toThrow(`the manifest of m@3 is not that of fingerprint ${fp.slice(0, 16)}`);
    expect(() => checkManifest(manifest, "0".repeat(64))).toThrow(/is not that of fingerprint 0000000000000000/);
  });
  it("refuses one that leaves bytes unchecked, and one of another shape", () => {
    expect(() => checkManifest({ ...manifest, gaps: [] }, fp)).toThrow(
      "the manifest of m@3 does not cover its files: file 0: bytes 0..16 are in no piece",
    );
    expect(() => checkManifest({ ...manifest, files: [{ size: 40, regions: [{ id: "x", key: "00" }] }] }, fp)).toThrow(
      /not a pull manifest/,
    );
    expect(() => checkManifest({ ...manifest, addresses: ["a:1", "b:2"] }, fp)).toThrow(/a region per lane/);
  });
});
