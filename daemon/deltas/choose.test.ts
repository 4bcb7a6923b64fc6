import { describe, expect, it } from "vitest";
import type { HostMemory } from "../../ffi/index.ts";
import { heldAs } from "../update/skip.ts";
import { chooseDeltas, deltaItems } from "./choose.ts";
import { deltaElem, deltaLimit, span, type TensorDelta, type VersionDelta } from "./derive.ts";

const t = (name: string, hash: string) => ({ name, hash, dtype: "BF16", shape: [4, 4] });
const held = (...tensors: ReturnType<typeof t>[]) => ({
  version: "x",
  hashes: new Map(tensors.map((x) => [x.name, heldAs(x)])),
});
const delta = (name: string, from: string, to: string, offset = 0): TensorDelta => ({
  name,
  dtype: "BF16",
  shape: [4, 4],
  from: heldAs(t(name, from)),
  to: heldAs(t(name, to)),
  baseHash: from,
  count: 3,
  offset,
  valuesBytes: 8,
  positionsBytes: 16,
  hashes: { forward: new BigUint64Array(1), back: new BigUint64Array(1) },
});
const version = (base: string, ...ds: TensorDelta[]): VersionDelta => ({
  base,
  mem: { address: 0x1000n, len: 1 << 20 } as HostMemory,
  tensors: new Map(ds.map((d) => [d.name, d])),
  seconds: 0,
});

describe("choosing deltas", () => {
  const target = [t("a", "a2"), t("b", "b2")];
  const own = version("m@1", delta("a", "a1", "a2"), delta("b", "b1", "b2"));

  it("takes the target's own delta where every receiver holds its base or the target already", () => {
    const holders = [
      { partial: true, deltas: true, holds: held(t("a", "a1"), t("b", "b1")) },
      { partial: true, deltas: true, holds: held(t("a", "a2"), t("b", "b9")) },
    ];
    const chosen = chooseDeltas(target, holders, own, []);
    expect([...chosen.keys()]).toEqual(["a"]); // b9 is neither end of b's delta
    expect(chosen.get("a")).toMatchObject({ source: own, back: false });
  });

  it("takes a later version's delta back to the target", () => {
    const later = version("m@2", delta("a", "a2", "a3"));
    const holders = [{ partial: true, deltas: true, holds: held(t("a", "a3"), t("b", "b2")) }];
    const chosen = chooseDeltas(target, holders, undefined, [later], new Set(["b"]));
    expect([...chosen.entries()]).toEqual([["a", { source: later, delta: later.tensors.get("a"), back: true }]]);
  });

  it("chooses none when any receiver does not apply deltas, holds nothing known, or there are none", () => {
    const holds = held(t("a", "a1"), t("b", "b1"));
    expect(chooseDeltas(target, [{ partial: true, deltas: false, holds }], own, []).size).toBe(0);
    expect(chooseDeltas(target, [{ partial: true, deltas: true }], own, []).size).toBe(0);
    expect(chooseDeltas(target, [], own, []).size).toBe(0);
  });

  it("plans each delta's span from its source's memory, numbered past the version's files", () => {
    const later = version("m@2", delta("a", "a2", "a3", 64));
    const chosen = new Map([
      ["a", { source: later, delta: later.tensors.get("a") as TensorDelta, back: true }],
      ["b", { source: own, delta: own.tensors.get("b") as TensorDelta, back: false }],
    ]);
    const v = { files: [{}], tensors: target.map((x, i) => ({ ...x, bytes: 32, file: 0, offset: 32 * i })) };
    const { items, sources, wholeBytes } = deltaItems(v, chosen);
    expect(sources).toEqual([later.mem, own.mem]); // files 1 and 2: past the version's one file
    expect(wholeBytes).toBe(64);
    // back: [positions, old values] from offset + values; forward: [values, positions].
    expect(items).toEqual([
      {
        name: "a",
        dtype: "BF16",
        shape: [4, 4],
        bytes: 24,
        file: 1,
        offset: 72,
        delta: { count: 3, positions: 0, values: 16 },
      },
      {
        name: "b",
        dtype: "BF16",
        shape: [4, 4],
        bytes: 24,
        file: 2,
        offset: 0,
        delta: { count: 3, positions: 8, values: 0 },
      },
    ]);
    expect(span(own.tensors.get("b") as TensorDelta, true)).toEqual({ offset: 8, bytes: 24, positions: 0, values: 16 });
  });
});

describe("which tensors may have a delta", () => {
  const rec = (over = {}) => ({
    name: "w",
    dtype: "BF16",
    shape: [256, 256],
    bytes: 131072,
    file: 0,
    offset: 0,
    hash: "h2",
    ...over,
  });
  it("a changed tensor of the same dtype and shape, large enough, with elements of 1 to 8 bytes", () => {
    expect(deltaElem(rec(), rec({ hash: "h1" }))).toBe(2);
    expect(deltaElem(rec(), rec())).toBe(0); // unchanged
    expect(deltaElem(rec(), undefined)).toBe(0);
    expect(deltaElem(rec(), rec({ hash: "h1", dtype: "F16" }))).toBe(0);
    expect(deltaElem(rec(), rec({ hash: "h1", shape: [128, 512] }))).toBe(0);
    expect(deltaElem(rec({ bytes: 1024, shape: [512] }), rec({ hash: "h1", bytes: 1024, shape: [512] }))).toBe(0);
    expect(deltaElem(rec({ dtype: "F4" }), rec({ hash: "h1", dtype: "F4" }))).toBe(0);
    expect(deltaLimit(131072, 2)).toBe(5461); // a quarter of the bytes at 6 bytes a change
  });
});
