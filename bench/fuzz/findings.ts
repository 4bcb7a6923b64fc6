/** What the fuzzer reports: a finding names its target, the input's seed and index, and the input. */

export interface Finding {
  target: string;
  index: number;
  /** What was wrong, in one line. */
  what: string;
  /** The input, as sent (bytes or text). */
  input: Uint8Array | string;
}

/** The first `max` bytes of an input in hex, with its length. */
export function hexOf(input: Uint8Array | string, max = 96): string {
  const bytes = typeof input === "string" ? new TextEncoder().encode(input) : input;
  const hex = Buffer.from(bytes.subarray(0, max)).toString("hex");
  return `${hex}${bytes.byteLength > max ? "…" : ""} (${bytes.byteLength} bytes)`;
}

/** The lines that let one replay a finding. */
export function describe(f: Finding, seed: number): string {
  return [
    `FINDING ${f.target} #${f.index}: ${f.what}`,
    `  replay: node --import tsx bench/fuzz.ts --seed ${seed} --replay ${f.target}:${f.index}`,
    `  input: ${hexOf(f.input)}`,
  ].join("\n");
}

/** A finding is thrown by a check; the runner records it and goes on. */
export class FindingError extends Error {
  constructor(
    readonly what: string,
    readonly input: Uint8Array | string,
  ) {
    super(what);
  }
}
