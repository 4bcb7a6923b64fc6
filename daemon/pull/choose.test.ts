import { describe, expect, it } from "vitest";
import { chooseVersion, type Holder } from "./choose.ts";

const fp = (c: string) => c.repeat(64);
const holder = (nodeId: string, versions: [string, string, string][], delivered?: [string, string]): Holder => ({
  nodeId,
  url: `http://${nodeId}:8470`,
  versions: versions.map(([name, f, at], i) => ({ name, version: i + 1, fingerprint: f, bytes: 1, registeredAt: at })),
  ...(delivered ? { delivered: delivered[0], deliveredAt: delivered[1] } : {}),
});

describe("chooseVersion", () => {
  const a = holder(
    "a",
    [
      ["m", fp("1"), "2026-01-01"],
      ["m", fp("2"), "2026-01-03"],
    ],
    [fp("1"), "2026-01-05"],
  );
  const b = holder("b", [["m", fp("1"), "2026-01-02"]]);
  const c = holder(
    "c",
    [
      ["m", fp("2"), "2026-01-04"],
      ["other", fp("3"), "2026-01-09"],
    ],
    [fp("3"), "2026-01-09"],
  );

  it("takes the fingerprint asked for, from every peer holding it", () => {
    const got = chooseVersion([a, b, c], "m", fp("2"));
    expect(got).toEqual({ fingerprint: fp("2"), sources: [a, c] });
  });
  it("else the one most recently delivered among the peers holding it under that name", () => {
    // c's later delivery is of another name: it does not count for "m"
    expect(chooseVersion([a, b, c], "m")).toEqual({ fingerprint: fp("1"), sources: [a, b] });
  });
  it("else the newest registered", () => {
    expect(chooseVersion([b, c], "m")).toEqual({ fingerprint: fp("2"), sources: [c] });
  });
  it("says why when nobody holds it", () => {
    expect(chooseVersion([a], "nope")).toEqual({ why: 'no up peer holds a version of "nope"' });
    expect(chooseVersion([a], "m", fp("9"))).toEqual({
      why: `no up peer holds "m" with fingerprint ${"9".repeat(16)}`,
    });
  });
});
