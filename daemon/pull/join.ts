/**
 * Elastic start (config `join`): a daemon that starts pulls the named checkpoint from its
 * peers (the version chosen as pulls choose it), trying again until one holds it, and every
 * engine that connects afterwards gets it without any further call: the engines of a new
 * host load their weights from ckptd, not from disk. Once an update delivered another version
 * here, engines that connect later get that one (when this daemon holds it).
 */
import type { Logger } from "pino";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import { withFingerprint } from "../update/fingerprint.ts";
import type { Updates } from "../update/updates.ts";

export interface JoinDeps {
  name: string;
  registry: Registry;
  updates: Updates;
  log: Logger;
  /** Starts a pull of `name` from the peers. */
  pull: () => Promise<CheckpointVersion>;
  /** Receivers connected now (an update needs one). */
  receivers: () => number;
  /** Wait between tries while no peer holds it, and between checks for an idle update path. */
  retryMs: number;
}

export type JoinState = "waiting" | "pulling" | "ready";

/** The longest wait between tries. */
export const MAX_RETRY_MS = 30_000;

export class Join {
  state: JoinState = "waiting";
  version?: CheckpointVersion;
  /** The last reason a try failed. */
  lastError?: string;
  private stopped = false;
  private retry?: ReturnType<typeof setTimeout>;
  private soon?: ReturnType<typeof setTimeout>;
  private delivering = false;
  /** An engine connected while a delivery ran: one more after it. */
  private again = false;

  constructor(private readonly deps: JoinDeps) {}

  /** Tries to pull until a version is held; engines connected meanwhile get it as it arrives. */
  start(): void {
    void this.fetch();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.retry);
    clearTimeout(this.soon);
  }

  status() {
    return {
      checkpoint: this.deps.name,
      state: this.state,
      ...(this.version ? { version: this.version.id } : {}),
      ...(this.lastError ? { lastError: this.lastError } : {}),
    };
  }

  private async fetch(): Promise<void> {
    const { log, name, registry, retryMs } = this.deps;
    let wait = retryMs;
    while (!this.stopped) {
      try {
        const v = await this.deps.pull();
        this.version = v;
        this.state = "pulling";
        log.info({ checkpoint: v.id }, "joining: pulling the fleet's version");
        this.connected(); // engines already here get it while it is pulled
        await v.done;
        if (v.state === "ready") {
          this.state = "ready";
          return;
        }
        throw new Error(v.error?.message ?? v.state);
      } catch (err) {
        // A failed try leaves nothing behind: its version is forgotten, not listed as failed.
        const failed = this.version;
        if (failed && failed.state === "failed") await registry.delete(failed.id).catch(() => undefined);
        this.version = undefined;
        this.state = "waiting";
        this.lastError = (err as Error).message;
        log.warn(
          { checkpoint: name, why: this.lastError, retryMs: wait },
          "joining: no version pulled yet; trying again",
        );
        await new Promise((r) => {
          this.retry = setTimeout(r, wait);
        });
        wait = Math.min(wait * 2, MAX_RETRY_MS); // a fleet that lacks it is not asked every heartbeat
      }
    }
  }

  /** An engine connected: it gets the version (soon: engines connecting together share one update). */
  connected(): void {
    if (this.delivering) this.again = true;
    if (this.stopped || this.soon !== undefined || this.delivering) return;
    this.soon = setTimeout(() => {
      this.soon = undefined;
      void this.deliver().then(() => {
        if (this.again) this.connected();
      });
    }, 100);
  }

  /** The version engines connecting now should have: the one delivered here last, else the joined one. */
  private target(): CheckpointVersion | undefined {
    const delivered = this.deps.updates.delivered?.fingerprint;
    return withFingerprint(this.deps.registry.list(), this.deps.name, delivered) ?? this.version;
  }

  private async deliver(): Promise<void> {
    const { updates, log, receivers, retryMs } = this.deps;
    this.delivering = true;
    this.again = false;
    try {
      for (let tries = 0; tries < 100; tries++) {
        const v = this.target();
        if (this.stopped || !v || receivers() === 0 || v.state === "failed") return;
        try {
          const { record, done } = updates.start(v.id, { peers: [], filling: v.state === "registering" });
          await done;
          log.info({ update: record.id, checkpoint: v.id, state: record.state }, "joining: engines given the version");
          return;
        } catch (err) {
          // Another update runs: its engines get a version; the new ones get ours after it.
          log.debug({ why: (err as Error).message }, "joining: update path busy");
          await new Promise((r) => setTimeout(r, retryMs));
        }
      }
      log.warn(
        { checkpoint: this.target()?.id },
        "joining: the update path stayed busy; engines connected meanwhile wait for the next update",
      );
    } finally {
      this.delivering = false;
    }
  }
}
