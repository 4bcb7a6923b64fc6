/**
 * Making one engine's calls of an update (engines/plan.ts) and recording each: what was called,
 * how it answered, how long it took. A failure names the engine and the step; after one, the
 * engine is resumed on whatever it holds, and its record says so.
 */
import type { EngineConfig } from "../config/index.ts";
import { preview } from "../errors.ts";
import { type Call, type EnginePlan, type Progress, recoveryCalls } from "./plan.ts";

export interface StepResult {
  step: string;
  ok: boolean;
  ms: number;
  error?: string;
}

/** An engine's part of an update, as the update record shows it. */
export interface EngineResult {
  name: string;
  kind: EngineConfig["kind"];
  steps: StepResult[];
  /** After a failure: whether the engine was resumed (or had not been paused). */
  resumed?: boolean;
}

export class EngineError extends Error {
  constructor(
    readonly engine: string,
    message: string,
  ) {
    super(`engine ${engine}: ${message}`);
    this.name = "EngineError";
  }
}

export class EngineRun {
  readonly result: EngineResult;
  private readonly done = new Set<string>();
  /** Steps the engine answered with a failure. */
  private readonly refused = new Set<string>();
  /** Steps sent but not answered: they may have happened. */
  private readonly unanswered = new Set<string>();

  constructor(
    readonly engine: EngineConfig,
    readonly plan: EnginePlan,
    /**
     * Each call's time limit, but the pause's (pauseMs: `wait` drains requests, which can take
     * long) and the receive call's (none: the receivers' acks bound the update; see
     * LocalRun.checkEngines for the bound once they are done).
     */
    private readonly limits: { callMs: number; pauseMs: number },
  ) {
    this.result = { name: engine.name, kind: engine.kind, steps: [] };
  }

  /** The calls before the bytes move; throws an EngineError at the first that fails. */
  async before(): Promise<void> {
    for (const call of this.plan.before) await this.must(call);
  }

  /** The call that makes the engine receive, in flight; resolves to its error, or undefined. */
  receive(): Promise<string | undefined> {
    return this.plan.receive ? this.call(this.plan.receive) : Promise.resolve(undefined);
  }

  /** The calls after a successful update; throws an EngineError at the first that fails. */
  async after(): Promise<void> {
    for (const call of this.plan.after) await this.must(call);
  }

  /**
   * After a failure: closes what the engine opened, resets and labels what it took, resumes
   * it (recoveryCalls); never throws. took: what its receivers took of the update.
   */
  async recover(took: Progress["took"], version: string): Promise<void> {
    const progress = { done: this.done, refused: this.refused, unanswered: this.unanswered, took };
    for (const call of recoveryCalls(this.plan, progress, version)) await this.call(call);
    this.result.resumed = !this.mayBePaused() || this.done.has("resume");
  }

  private mayBePaused(): boolean {
    return this.done.has("pause") || this.unanswered.has("pause");
  }

  /** Whether the engine is paused now, for the update's error message ("" when it is never paused). */
  describe(): string {
    if (!this.plan.before.some((c) => c.step === "pause")) return "";
    if (!this.mayBePaused()) return "not paused";
    return this.result.resumed ? "resumed" : "NOT resumed (its resume call failed)";
  }

  /** Whether the engine has calls of its own (not a receiver that connects by itself). */
  get driven(): boolean {
    return this.plan.receive !== undefined || this.plan.before.length > 0;
  }

  private async must(call: Call): Promise<void> {
    const err = await this.call(call);
    if (err !== undefined) throw new EngineError(this.engine.name, `${call.step} failed: ${err}`);
  }

  /** Makes one call; resolves to its error, or undefined. */
  private async call(call: Call): Promise<string | undefined> {
    const t0 = performance.now();
    const limit =
      call === this.plan.receive ? undefined : call.step === "pause" ? this.limits.pauseMs : this.limits.callMs;
    const { error, answered } = await request(this.url(call), call, limit);
    const ms = Math.round(performance.now() - t0);
    this.result.steps.push({ step: call.step, ok: error === undefined, ms, ...(error === undefined ? {} : { error }) });
    if (error === undefined) this.done.add(call.step);
    else (answered ? this.refused : this.unanswered).add(call.step);
    return error;
  }

  private url(call: Call): string {
    const base = this.engine.url as string;
    return call.path === "" ? base : `${base.replace(/\/$/, "")}${call.path}`;
  }
}

/**
 * POSTs the call's JSON body; resolves to an error message naming the url (or none), and
 * whether the engine answered at all.
 */
async function request(
  url: string,
  call: Call,
  timeoutMs: number | undefined,
): Promise<{ error?: string; answered: boolean }> {
  let res: Response;
  let text: string;
  try {
    res = await fetch(url, {
      method: call.method,
      headers: { "content-type": "application/json" },
      ...(call.body === undefined ? {} : { body: JSON.stringify(call.body) }),
      ...(timeoutMs === undefined ? {} : { signal: AbortSignal.timeout(timeoutMs) }),
    });
    text = await res.text();
  } catch (err) {
    const e = err as Error;
    const error =
      e?.name === "TimeoutError" ? `${url} did not answer within ${timeoutMs} ms` : `${url}: ${e?.message ?? e}`;
    return { error, answered: false };
  }
  if (!res.ok) return { error: `${url} answered ${res.status}: ${text.slice(0, 300)}`, answered: true };
  return { error: failureIn(text), answered: true };
}

/**
 * An engine's failure stated in a 200 answer: SGLang's {"success": false, "message"}, vLLM's
 * collective_rpc {"results": [per worker]} where the ckptd extension returns {ok, error}.
 * Anything else (no JSON, other fields) is a success.
 */
export function failureIn(text: string): string | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (parsed === null || typeof parsed !== "object") return undefined;
  const o = parsed as { success?: unknown; message?: unknown; results?: unknown };
  if (o.success === false) {
    return `the engine answered success: false: ${typeof o.message === "string" ? o.message.slice(0, 300) : preview(o.message)}`;
  }
  if (!Array.isArray(o.results)) return undefined;
  const bad = (o.results as { ok?: unknown; error?: unknown }[]).find((r) => r && r.ok === false);
  return bad ? `a worker failed: ${typeof bad.error === "string" ? bad.error : preview(bad)}` : undefined;
}
