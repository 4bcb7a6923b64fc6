import { describe, expect, it } from "vitest";
import { gapsOf, MAX_MISMATCHES, type Piece, Stripe, tilingError } from "./stripe.ts";

const piece = (name: string, file: number, begin: number, end: number): Piece => ({
  name,
  file,
  begin,
  end,
  hash: "0".repeat(16),
});

/** Two files: [header 0..8, a 8..40, b 40..100] and [header 0..10, c 10..30]. */
const sizes = [100, 30];
const pieces = [
  piece("h0", 0, 0, 8),
  piece("a", 0, 8, 40),
  piece("b", 0, 40, 100),
  piece("h1", 1, 0, 10),
  piece("c", 1, 10, 30),
];

/** Takes every range `source` may take, and lands them; returns the pieces that became ready. */
function drain(s: Stripe, source: string): number[] {
  const ready: number[] = [];
  for (let r = s.take(source); r; r = s.take(source)) ready.push(...s.landed(r, source));
  return ready;
}

describe("gapsOf and tilingError", () => {
  it("finds the bytes no tensor covers", () => {
    expect(
      gapsOf(100, [
        { begin: 10, end: 40 },
        { begin: 50, end: 90 },
        { begin: 50, end: 50 },
      ]),
    ).toEqual([
      [0, 10],
      [40, 50],
      [90, 100],
    ]);
    expect(gapsOf(10, [{ begin: 0, end: 10 }])).toEqual([]);
  });
  it("accepts pieces that cover each file exactly once, and names the bytes that are not", () => {
    expect(tilingError(sizes, pieces)).toBeUndefined();
    expect(
      tilingError(
        sizes,
        pieces.filter((p) => p.name !== "a"),
      ),
    ).toBe("file 0: bytes 8..40 are in no piece");
    expect(tilingError(sizes, [...pieces, piece("x", 0, 30, 50)])).toMatch(/file 0: bytes .* are in two pieces/);
    expect(tilingError([100, 40], pieces)).toBe("file 1: bytes 30..40 are in no piece");
    expect(tilingError(sizes, [...pieces, piece("y", 5, 0, 1)])).toMatch(/in no piece|does not exist/);
  });
});

describe("Stripe", () => {
  it("cuts the files into ranges and readies each piece once every range over it has landed", () => {
    const s = new Stripe(sizes, pieces, 16);
    const first = s.take("A");
    expect(first).toMatchObject({ file: 0, offset: 0, len: 16 });
    expect(s.landed(first as NonNullable<typeof first>, "A")).toEqual([0]); // h0 whole; a not yet
    const ready = drain(s, "B");
    expect(ready.sort()).toEqual([1, 2, 3, 4]);
    for (const i of [0, 1, 2, 3, 4]) s.verified(i);
    expect(s.done()).toBe(true);
    expect(s.verifiedBytes).toBe(130);
  });

  it("gives a failed range to the others, never back to the source it failed on", () => {
    const s = new Stripe([10], [piece("a", 0, 0, 10)], 16);
    const r = s.take("A") as NonNullable<ReturnType<Stripe["take"]>>;
    s.failed(r, "A");
    expect(s.take("A")).toBeUndefined();
    expect(s.take("B")).toMatchObject({ offset: 0, len: 10 });
    // a refused range (busy) goes back for anyone
    const t = new Stripe([10], [piece("a", 0, 0, 10)], 16);
    t.failed(t.take("A") as NonNullable<ReturnType<Stripe["take"]>>);
    expect(t.take("A")).toBeDefined();
  });

  it("fetches a piece that hashed wrong again from one source that served none of it; one that served it alone is guilty", () => {
    const s = new Stripe([64], [piece("a", 0, 0, 64)], 16);
    // A and B each serve two of a's four ranges
    for (const src of ["A", "B", "A", "B"]) s.landed(s.take(src) as NonNullable<ReturnType<Stripe["take"]>>, src);
    const mixed = s.mismatch(0, ["A", "B", "C"]);
    expect(mixed).toEqual({ served: ["A", "B"] });
    expect(s.take("A")).toBeUndefined();
    expect(s.take("B")).toBeUndefined();
    expect(drain(s, "C")).toEqual([0]); // all four ranges, for C alone
    expect(s.mismatch(0, ["A", "B", "C"])).toEqual({ served: ["C"], guilty: "C" });
    expect(s.take("C")).toBeUndefined();
    expect(drain(s, "A")).toEqual([0]); // C is out; the first allowed source takes the whole piece
    expect(() => s.mismatch(0, ["A", "B"])).toThrow(`"a" hashed wrong ${MAX_MISMATCHES} times (served by A)`);
  });

  it("frees the ranges kept for a source when it goes, and lists what is missing", () => {
    const s = new Stripe([32], [piece("a", 0, 0, 32)], 16);
    for (const src of ["A", "C"]) s.landed(s.take(src) as NonNullable<ReturnType<Stripe["take"]>>, src);
    s.mismatch(0, ["B", "A"]);
    expect(s.take("A")).toBeUndefined(); // kept for B, which served none
    s.release("B");
    expect(s.take("A")).toBeDefined();
    expect(s.missing().map((p) => p.name)).toEqual(["a"]);
  });

  it("cuts no range over the pieces that are here, and fetches one that hashed wrong from the sources", () => {
    // a and c are here: what is fetched is h0, b, h1, in ranges that avoid a and c.
    const s = new Stripe(sizes, pieces, 16, new Set([1, 4]));
    const taken: [number, number, number][] = [];
    for (let r = s.take("A"); r; r = s.take("A")) {
      taken.push([r.file, r.offset, r.offset + r.len]);
      s.landed(r, "A");
    }
    expect(taken).toEqual([
      [0, 0, 8],
      [0, 40, 56],
      [0, 56, 72],
      [0, 72, 88],
      [0, 88, 100],
      [1, 0, 10],
    ]);
    for (const i of [0, 2, 3]) s.verified(i);
    expect(s.done()).toBe(false);
    expect(s.verifiedSpan(0, 8, 40)).toBe(false);
    s.verified(1);
    s.mismatch(4, ["A"]); // the copy here did not hash right: c comes from a source
    expect(s.take("A")).toMatchObject({ file: 1, offset: 10, len: 16 });
    expect(s.missing().map((p) => p.name)).toEqual(["c"]);
  });

  it("counts empty pieces as verified from the start", () => {
    const s = new Stripe([8], [piece("h", 0, 0, 8), piece("empty", 0, 8, 8)], 16);
    drain(s, "A");
    s.verified(0);
    expect(s.done()).toBe(true);
  });
});
