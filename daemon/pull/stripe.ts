/**
 * What a pull still has to fetch and verify, as a pure state machine. A version's files are
 * cut into ranges of `chunkBytes`, handed to sources one at a time as they ask (a fast source
 * asks more often, so it takes more); every byte belongs to exactly one piece (a tensor, or
 * the bytes between them: the header, padding), each with the source's ckpt hash. A piece is
 * hashed once every range over it has landed. A mismatch sends its bytes back as new ranges,
 * all for one source (so that a second mismatch names the culprit): one that served none of
 * it if there is one. A source that alone served a piece that hashed wrong is guilty: it gets
 * none of it again (and the pull drops it). A range that failed on a source goes back too,
 * free for any other.
 */

export interface Piece {
  /** The tensor's name, or "header and padding of file N". */
  name: string;
  file: number;
  begin: number;
  end: number;
  /** The ckpt hash (ckpt.h), 16 hex digits. */
  hash: string;
}

export interface Range {
  file: number;
  offset: number;
  len: number;
}

interface Pending extends Range {
  /** Sources that must not get it: they failed it, or served bytes that did not hash. */
  avoid: Set<string>;
  /** The one source that may take it (a piece fetched again), if any. */
  only?: string;
  /** Indexes of the pieces it overlaps. */
  pieces: number[];
}

/** Pieces that hashed wrong this often fail the pull: no source has them right. */
export const MAX_MISMATCHES = 3;

/** The byte ranges of [0, size) that no tensor covers (header, padding): pure. */
export function gapsOf(size: number, tensors: readonly { begin: number; end: number }[]): [number, number][] {
  const sorted = [...tensors].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  const gaps: [number, number][] = [];
  let at = 0;
  for (const t of sorted) {
    if (t.begin > at) gaps.push([at, t.begin]);
    at = Math.max(at, t.end);
  }
  if (at < size) gaps.push([at, size]);
  return gaps;
}

/** Why `pieces` do not cover every byte of the files exactly once, if they do not: pure. */
export function tilingError(sizes: readonly number[], pieces: readonly Piece[]): string | undefined {
  for (let file = 0; file < sizes.length; file++) {
    const mine = pieces.filter((p) => p.file === file && p.end > p.begin).sort((a, b) => a.begin - b.begin);
    let at = 0;
    for (const p of mine) {
      if (p.begin !== at)
        return `file ${file}: bytes ${Math.min(at, p.begin)}..${Math.max(at, p.begin)} are ${p.begin > at ? "in no piece" : "in two pieces"}`;
      at = p.end;
    }
    if (at !== sizes[file]) return `file ${file}: bytes ${at}..${sizes[file]} are in no piece`;
  }
  if (pieces.some((p) => p.file < 0 || p.file >= sizes.length)) return "a piece names a file that does not exist";
  return undefined;
}

export class Stripe {
  private readonly pending: Pending[] = [];
  /** Per piece: ranges over it not landed yet; the sources that served its bytes; mismatches. */
  private readonly outstanding: number[];
  private readonly servedBy: Set<string>[];
  private readonly mismatches: number[];
  /** Per piece: sources that alone served it wrong. */
  private readonly guilty: (Set<string> | undefined)[] = [];
  private readonly isVerified: boolean[];
  private readonly byFile: number[][];
  verifiedBytes = 0;

  /**
   * `here`: pieces this daemon copies from a version of its own (a tensor it holds with the
   * same hash): no range is cut over them; they count once `verified`, or go to the sources
   * after a `mismatch`.
   */
  constructor(
    sizes: readonly number[],
    readonly pieces: readonly Piece[],
    private readonly chunkBytes: number,
    here: ReadonlySet<number> = new Set(),
  ) {
    this.outstanding = pieces.map(() => 0);
    this.servedBy = pieces.map(() => new Set());
    this.mismatches = pieces.map(() => 0);
    this.isVerified = pieces.map((p) => p.end === p.begin);
    this.byFile = sizes.map((_, f) =>
      pieces
        .map((p, i) => ({ p, i }))
        .filter(({ p }) => p.file === f && p.end > p.begin)
        .sort((a, b) => a.p.begin - b.p.begin)
        .map(({ i }) => i),
    );
    sizes.forEach((size, file) => {
      // The spans between the pieces that are here, each cut into ranges.
      let at = 0;
      for (const i of this.byFile[file] ?? []) {
        if (!here.has(i)) continue;
        const p = this.pieces[i] as Piece;
        if (p.begin > at) this.queue(file, at, p.begin, new Set());
        at = p.end;
      }
      if (size > at) this.queue(file, at, size, new Set());
    });
  }

  /** Cuts [begin, end) of a file into ranges, each knowing the pieces it overlaps. */
  private queue(file: number, begin: number, end: number, avoid: Set<string>, only?: string): void {
    for (let offset = begin; offset < end; offset += this.chunkBytes) {
      const len = Math.min(this.chunkBytes, end - offset);
      const pieces = this.overlapping(file, offset, offset + len);
      for (const i of pieces) this.outstanding[i] = (this.outstanding[i] ?? 0) + 1;
      this.pending.push({ file, offset, len, avoid: new Set(avoid), pieces, ...(only ? { only } : {}) });
    }
  }

  private overlapping(file: number, begin: number, end: number): number[] {
    const order = this.byFile[file] ?? [];
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((this.pieces[order[mid] as number] as Piece).end <= begin) lo = mid + 1;
      else hi = mid;
    }
    const out: number[] = [];
    for (let k = lo; k < order.length; k++) {
      const i = order[k] as number;
      if ((this.pieces[i] as Piece).begin >= end) break;
      out.push(i);
    }
    return out;
  }

  /** The next range for `source` (of a file `usable` allows), or undefined when none is left that it may take. */
  take(source: string, usable: (file: number) => boolean = () => true): (Range & { pieces: number[] }) | undefined {
    const k = this.pending.findIndex(
      (r) => !r.avoid.has(source) && (r.only === undefined || r.only === source) && usable(r.file),
    );
    if (k < 0) return undefined;
    const [r] = this.pending.splice(k, 1) as [Pending];
    return r;
  }

  /** A range landed from `source`: the pieces whose every byte is now here, to hash. */
  landed(range: { pieces: number[] }, source: string): number[] {
    const ready: number[] = [];
    for (const i of range.pieces) {
      this.servedBy[i]?.add(source);
      this.outstanding[i] = (this.outstanding[i] ?? 1) - 1;
      if (this.outstanding[i] === 0 && !this.isVerified[i]) ready.push(i);
    }
    return ready;
  }

  /**
   * A range was not fetched: it goes back, and `avoid` (the source it failed on) never gets it
   * again; a range kept for one source is free for any once that source failed it.
   */
  failed(range: Range & { pieces: number[] }, avoid?: string): void {
    const r = range as Pending;
    const set = new Set(r.avoid ?? []);
    if (avoid !== undefined) set.add(avoid);
    this.pending.push({ file: r.file, offset: r.offset, len: r.len, pieces: r.pieces, avoid: set });
  }

  /** A source is gone: the ranges kept for it are free for any. */
  release(source: string): void {
    for (const r of this.pending) if (r.only === source) r.only = undefined;
  }

  /** Piece i hashed right. */
  verified(i: number): void {
    if (this.isVerified[i]) return;
    this.isVerified[i] = true;
    const p = this.pieces[i] as Piece;
    this.verifiedBytes += p.end - p.begin;
  }

  /**
   * Piece i hashed wrong: its bytes go back, for one of the `live` sources (one that served
   * none of them, if any). Returns who served them, and the guilty source if one did alone;
   * throws once the piece failed MAX_MISMATCHES times.
   */
  mismatch(i: number, live: readonly string[]): { served: string[]; guilty?: string } {
    const p = this.pieces[i] as Piece;
    const count = (this.mismatches[i] ?? 0) + 1;
    this.mismatches[i] = count;
    const served = [...(this.servedBy[i] ?? [])];
    if (count >= MAX_MISMATCHES) {
      throw new Error(`"${p.name}" hashed wrong ${count} times (served by ${served.join(", ")})`);
    }
    const guilty = served.length === 1 ? served[0] : undefined;
    const avoid = this.guilty[i] ?? new Set<string>();
    if (guilty !== undefined) avoid.add(guilty);
    this.guilty[i] = avoid;
    const allowed = live.filter((s) => !avoid.has(s));
    const only = allowed.find((s) => !served.includes(s)) ?? allowed[0];
    this.servedBy[i] = new Set();
    this.queue(p.file, p.begin, p.end, new Set(avoid), only);
    return guilty === undefined ? { served } : { served, guilty };
  }

  /** Whether every piece over [begin, end) of a file is verified. */
  verifiedSpan(file: number, begin: number, end: number): boolean {
    return this.overlapping(file, begin, end).every((i) => this.isVerified[i]);
  }

  /** Every piece verified. */
  done(): boolean {
    return this.isVerified.every(Boolean);
  }

  /** The pieces not verified yet (for a failure's message). */
  missing(): Piece[] {
    return this.pieces.filter((_, i) => !this.isVerified[i]);
  }
}
