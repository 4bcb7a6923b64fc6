import { describe, expect, it } from "vitest";
import { heldAs, heldByAll } from "./skip.ts";

const t = (name: string, hash: string, dtype = "BF16", shape = [4, 4]) => ({ name, hash, dtype, shape });
const tensors = [t("a", "1"), t("b", "2"), t("c", "3")];
/** A receiver holding tensors named as given, with these hashes (BF16 [4, 4], unless given whole). */
const holding = (version: string, entries: [string, string][]) => ({
  version,
  hashes: new Map(entries.map(([name, hash]) => [name, hash.includes(" ") ? hash : heldAs(t(name, hash))])),
});

describe("heldByAll", () => {
  it("leaves out what every receiver holds with the same hash, and nothing else", () => {
    const one = {
      partial: true,
      holds: holding("m@1", [
        ["a", "1"],
        ["b", "x"],
        ["c", "3"],
      ]),
    };
    const two = {
      partial: true,
      holds: holding("m@2", [
        ["a", "1"],
        ["b", "2"],
      ]),
    };
    expect([...heldByAll(tensors, [one])]).toEqual(["a", "c"]);
    expect([...heldByAll(tensors, [one, two])]).toEqual(["a"]);
  });

  it("leaves out a tensor of the same bytes only when its dtype and shape are the same too", () => {
    const other = {
      partial: true,
      holds: holding("n@1", [
        ["a", heldAs(t("a", "1", "F16"))],
        ["b", heldAs(t("b", "2", "BF16", [16]))],
        ["c", "3"],
      ]),
    };
    expect([...heldByAll(tensors, [other])]).toEqual(["c"]);
  });

  it("leaves out nothing when a receiver holds nothing known, asks for whole updates, or none takes part", () => {
    const all = {
      partial: true,
      holds: holding("m@1", [
        ["a", "1"],
        ["b", "2"],
        ["c", "3"],
      ]),
    };
    expect(heldByAll(tensors, [all]).size).toBe(3);
    expect(heldByAll(tensors, [all, { partial: true }]).size).toBe(0);
    expect(heldByAll(tensors, [all, { ...all, partial: false }]).size).toBe(0);
    expect(heldByAll(tensors, []).size).toBe(0);
  });
});
