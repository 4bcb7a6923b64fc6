/** Runs a target's inputs (a few at once), checking the daemon's health and RSS between them. */
import type { ChildDaemon } from "./daemon.ts";
import { type Finding, FindingError } from "./findings.ts";
import { Rng } from "./rng.ts";

export interface Target {
  name: string;
  /** Inputs in flight at once. */
  concurrency: number;
  /** Runs input `index` on its own stream; throws FindingError when the daemon misbehaved. */
  one(rng: Rng, index: number): Promise<void>;
  /** Undoes what inputs left behind (uploads, versions), between batches and at the end. */
  tidy?(): Promise<void>;
}

export interface TargetResult {
  name: string;
  inputs: number;
  seconds: number;
  findings: Finding[];
}

/** Health checks and RSS samples: every this many inputs. */
const CHECK_EVERY = 250;

export class Runner {
  rssStart = 0;
  rssPeak = 0;
  rssEnd = 0;
  /** Times the daemon died (and was started again). */
  deaths = 0;

  constructor(
    private readonly daemon: ChildDaemon,
    private readonly seed: number,
  ) {}

  /** Samples the RSS; a dead or slow daemon is a finding charged to the last input. */
  async check(target: string, index: number): Promise<Finding | undefined> {
    const rss = this.daemon.rss();
    this.rssStart ||= rss;
    this.rssPeak = Math.max(this.rssPeak, rss);
    if (rss) this.rssEnd = rss;
    const why = await this.daemon.unhealthy();
    return why ? { target, index, what: `after this input: ${why}`, input: "" } : undefined;
  }

  /** Inputs `indices` of `target` (all of 0..n-1 by default). A daemon that died is a finding, and is started again. */
  async run(target: Target, n: number, indices?: number[]): Promise<TargetResult> {
    const todo = indices ?? Array.from({ length: n }, (_, i) => i);
    const findings: Finding[] = [];
    const inFlight = new Set<number>();
    const t0 = performance.now();
    let next = 0;
    let done = 0;
    let restarting: Promise<void> | undefined;
    const worker = async () => {
      for (;;) {
        await restarting;
        if (next >= todo.length) break;
        const index = todo[next++] as number;
        inFlight.add(index);
        const found = await this.input(target, index);
        if (!this.daemon.alive && !restarting) {
          found.push(this.death(target.name, index, [...inFlight]));
          restarting = this.daemon.restart().finally(() => {
            restarting = undefined;
          });
        }
        inFlight.delete(index);
        findings.push(...found);
        if (++done % CHECK_EVERY === 0) findings.push(...(await this.between(target, index)));
      }
    };
    await Promise.all(Array.from({ length: target.concurrency }, worker));
    await restarting;
    findings.push(...(await this.between(target, todo[todo.length - 1] ?? 0)));
    return { name: target.name, inputs: done, seconds: (performance.now() - t0) / 1000, findings };
  }

  /** The daemon died: which inputs were in flight, and its last words. */
  private death(target: string, index: number, inFlight: number[]): Finding {
    this.deaths++;
    const last = this.daemon.logs
      .filter((l) => !l.startsWith("{"))
      .join(" ")
      .replace(/\s+/g, " ");
    return {
      target,
      index,
      what: `the daemon died (exit ${this.daemon.exitCode}) with inputs ${inFlight.map((i) => `#${i}`).join(", ")} in flight: ${last.slice(-600)}`,
      input: "",
    };
  }

  /** Tidies and checks the daemon; what goes wrong is charged to the input run last. */
  private async between(target: Target, index: number): Promise<Finding[]> {
    const found: Finding[] = [];
    try {
      await target.tidy?.();
    } catch (err) {
      const what = err instanceof FindingError ? err.what : `tidying failed: ${(err as Error).message}`;
      found.push({ target: target.name, index, what, input: err instanceof FindingError ? err.input : "" });
    }
    const f = await this.check(target.name, index);
    if (f) found.push(f);
    return found;
  }

  private async input(target: Target, index: number): Promise<Finding[]> {
    try {
      await target.one(Rng.of(this.seed, target.name, index), index);
      return [];
    } catch (err) {
      if (err instanceof FindingError) return [{ target: target.name, index, what: err.what, input: err.input }];
      return [{ target: target.name, index, what: `the fuzzer itself failed: ${(err as Error).stack}`, input: "" }];
    }
  }
}
