import { describe, expect, it } from "vitest";
import { heldByAll } from "./skip.ts";

const tensors = [
  { name: "a", hash: "1" },
  { name: "b", hash: "2" },
  { name: "c", hash: "3" },
];
const holding = (version: string, entries: [string, string][]) => ({ version, hashes: new Map(entries) });

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
