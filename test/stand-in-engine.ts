/**
 * A stand-in for a vLLM or SGLang server's RL routes (as engines/plan.ts calls them), whose
 * receivers are real: reference receivers on the daemon's sockets. It records every call,
 * keeps the state the calls change (paused, open update, weight version, cache resets), and
 * can be told to fail any step with a status.
 * - vLLM (weight transfer API): init connects one receiver per GPU, which stays connected (as
 *   ckptd's backend does); update_weights answers once they saw the update end, 500 if aborted.
 * - SGLang: update_weights_from_tensor connects one receiver per rank on first use, and, like
 *   SGLang, always answers success (its loader reports nothing back), setting a weight_version
 *   given in the request even then: the daemon's result is the truth.
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { ReferenceReceiver } from "./reference-receiver.ts";

export interface Call {
  path: string;
  body: unknown;
}

export class StandInEngine {
  readonly calls: Call[] = [];
  readonly receivers: ReferenceReceiver[] = [];
  /** Step path (without query) -> the status to answer with instead. */
  readonly failures = new Map<string, number>();
  paused = false;
  pauseMode = "";
  /** SGLang would have died (a cache flush asked while requests were queued or running). */
  crashed = false;
  open = false;
  version?: string;
  cacheResets = 0;
  /** How long update_weights waits after its receivers saw the update end, before answering. */
  answerDelayMs = 0;
  /** update_weights answers success even when its receivers saw an abort (workers that did not raise). */
  answerOk = false;
  /** Whether finish_weight_update came while an update_weights call was still running (vLLM would refuse it). */
  raced = false;
  url = "";
  private updating = 0;
  /** Per SGLang rank: the message number after the last `begin` its loader took. */
  private consumed: number[] = [];
  private server?: Server;

  constructor(
    readonly kind: "vllm" | "sglang",
    readonly gpus: number[],
    /** SGLang's socket dir (its CKPTD_SOCKET_DIR); vLLM gets it in init_info. */
    readonly socketDir = "",
  ) {}

  async listen(): Promise<this> {
    this.server = createServer((req, res) => {
      let text = "";
      req.on("data", (c) => {
        text += c;
      });
      req.on("end", async () => {
        const path = (req.url ?? "").split("?")[0] as string;
        const body = text ? JSON.parse(text) : undefined;
        this.calls.push({ path: req.url ?? "", body });
        const status = this.failures.get(path);
        if (status !== undefined) {
          if (path === "/update_weights") this.open = false; // vLLM's worker closes its update when it raises
          res.writeHead(status).end(`injected failure of ${path}`);
          return;
        }
        const [code, answer] = await this.handle(path, body);
        res.writeHead(code, { "content-type": "application/json" }).end(JSON.stringify(answer));
      });
    });
    await new Promise<void>((resolve) => this.server?.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  /** The calls' paths, in order. */
  paths(): string[] {
    return this.calls.map((c) => c.path);
  }

  private async connect(socketDir: string): Promise<void> {
    if (this.receivers.length > 0) return;
    for (const [rank, gpu] of this.gpus.entries()) {
      const r = new ReferenceReceiver(`${socketDir}/gpu-${gpu}.sock`, `${this.kind}-rank${rank}`);
      await r.connect();
      this.receivers.push(r);
    }
  }

  // biome-ignore lint/suspicious/noExplicitAny: the bodies of the engines' routes, as they come
  private async handle(path: string, body: any): Promise<[number, unknown]> {
    switch (path) {
      case "/init_weight_transfer_engine":
        await this.connect(body.init_info.socket_dir);
        return [200, { message: "Weight transfer initialized" }];
      case "/pause":
      case "/pause_generation":
        this.paused = true;
        this.pauseMode = body?.mode ?? new URLSearchParams(this.calls.at(-1)?.path.split("?")[1]).get("mode") ?? "";
        return [200, { status: "paused" }];
      case "/start_weight_update":
        if (this.open) return [400, { error: "a weight update is already in progress" }];
        this.open = true;
        return [200, { message: "Weight update started" }];
      case "/update_weights": {
        if (!this.open) return [500, { error: "start_weight_update was not called" }];
        this.updating++;
        const ends = await Promise.all(this.receivers.map((r) => r.ended(body.update_info.update)));
        await new Promise((resolve) => setTimeout(resolve, this.answerDelayMs));
        this.updating--;
        if (ends.includes("abort") && !this.answerOk) {
          this.open = false; // vLLM's worker closes the session when update_weights raises
          return [500, { error: "UpdateAborted" }];
        }
        return [200, { message: "Weights updated" }];
      }
      case "/finish_weight_update":
        if (this.updating > 0) {
          this.raced = true;
          return [409, { error: "update_weights is still running" }];
        }
        if (!this.open) return [500, { error: "no weight update in progress" }];
        this.open = false;
        if (body?.weight_version) this.version = body.weight_version;
        return [200, { message: "Weight update finished" }];
      case "/reset_prefix_cache":
        this.cacheResets++;
        return [200, {}];
      case "/resume":
      case "/continue_generation":
        this.paused = false;
        return [200, { status: "resumed" }];
      case "/update_weights_from_tensor": {
        // each rank's loader takes the next update its socket brings, as a receiver reads in order
        await this.connect(this.socketDir);
        const begins = await Promise.all(this.receivers.map((r, i) => waitBegin(r, this.consumed[i] ?? 0)));
        this.consumed = begins.map(([, at]) => at + 1);
        const begin = begins.map(([update]) => update);
        const ends = await Promise.all(this.receivers.map((r, i) => r.ended(begin[i] as string)));
        if (body.flush_cache && !(this.paused && this.pauseMode === "abort")) {
          // SGLang flushes only an idle scheduler, and asserts on the failed flush: the server dies
          this.crashed = true;
          return [500, { error: "AssertionError: Cache flush failed after updating weights" }];
        }
        if (ends.length > 0 && body.flush_cache) this.cacheResets++;
        if (body.weight_version) this.version = body.weight_version;
        return [200, { success: true, message: "Success" }];
      }
      case "/update_weight_version":
        this.version = body.new_version;
        return [
          200,
          { success: true, message: `Weight version updated to ${body.new_version}`, new_version: body.new_version },
        ];
      default:
        return [404, { detail: "Not Found" }];
    }
  }

  async close(): Promise<void> {
    for (const r of this.receivers) await r.close();
    this.server?.closeAllConnections();
    await new Promise((resolve) => this.server?.close(resolve));
  }
}

/** The update id and message number of the first `begin` (or `abort`) a receiver saw from message number `from` on. */
async function waitBegin(r: ReferenceReceiver, from: number): Promise<[string, number]> {
  for (;;) {
    // an abort before any begin ends the wait too, as it ends ckptd's loader's (a driven receive)
    const at = r.seen.findIndex((x, i) => i >= from && (x.op === "begin" || x.op === "abort"));
    if (at >= 0) return [r.seen[at]?.update as string, at];
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}
