/**
 * The RL update sequence for one configured engine, as data: which HTTP calls come before the
 * bytes move (pause, open the update), which call makes the engine receive them, and which
 * come after (finish with the weight version, reset the prefix cache, resume). A pure function
 * of the engine's configuration and the update; engines/run.ts makes the calls.
 *
 * vLLM, weight transfer API (vLLM 0.25+, `--weight-transfer-config '{"backend": "ckptd"}'`),
 * the routes of vllm/entrypoints/serve/dev/rlhf/api_router.py (VLLM_SERVER_DEV_MODE=1):
 *   init_weight_transfer_engine, pause?mode=, start_weight_update, update_weights (in flight
 *   while the daemon pushes), finish_weight_update {weight_version}, reset_prefix_cache, resume.
 * vLLM, worker extension (older vLLM): pause, collective_rpc "ckptd_update", reset_prefix_cache,
 *   resume (no weight version: those vLLMs have no route for it).
 * SGLang (python/sglang/srt/entrypoints/http_server.py): pause_generation {mode},
 *   update_weights_from_tensor (empty per-rank payloads: ckptd's loader reads the socket; the
 *   draft model excluded; the cache flushed), then update_weight_version and
 *   continue_generation. The version is set only after the daemon saw every rank apply the
 *   update: SGLang answers success whatever a custom loader did, and would set a version
 *   passed in the request after a failed update too. The cache is flushed only after an
 *   `abort` pause: SGLang's flush works only when the scheduler is idle, waiting queue
 *   included, and a flush asked in the request that fails is an assert that kills the server
 *   (`retract` puts the running requests back in the queue, `in_place` keeps them running).
 * http: the configured body to the configured url, nothing around it.
 */
import type { EngineConfig } from "../config/index.ts";
import type { BucketOrder } from "../update/plan.ts";

export interface Call {
  /** The step's name in the update record and in errors. */
  step: string;
  method: "POST";
  /** The path (and query) under the engine's url; "" for an http engine's own url. */
  path: string;
  body?: unknown;
}

export interface EnginePlan {
  /** In order, before the bytes move; each must succeed. */
  before: Call[];
  /** Makes the engine receive; answers once it has (or failed). None: it connects by itself. */
  receive?: Call;
  /** In order, after every receiver applied the update. */
  after: Call[];
}

export interface UpdateFacts {
  /** The daemon's update id. */
  update: string;
  /** The engine's weight version afterwards: the checkpoint's name@N, and its fingerprint. */
  version: string;
  socketDir: string;
  receiverTimeoutMs: number;
}

/** Base64 of pickle.dumps([], protocol=4): an SGLang rank's tensor payload with no tensors. */
export const SGLANG_EMPTY_PAYLOAD = "gARdlC4=";

export const PAUSE_MODES = {
  vllm: ["keep", "wait", "abort", "none"],
  sglang: ["retract", "in_place", "abort", "none"],
};
export const DEFAULT_PAUSE = { vllm: "keep", sglang: "abort" } as const;

const post = (step: string, path: string, body?: unknown): Call => ({
  step,
  method: "POST",
  path,
  ...(body === undefined ? {} : { body }),
});

/** The calls an update makes to `e`, in order. */
export function planEngine(e: EngineConfig, u: UpdateFacts): EnginePlan {
  const seconds = u.receiverTimeoutMs / 1000;
  if (e.kind === "receiver") return { before: [], after: [] };
  if (e.kind === "http") return { before: [], receive: post("trigger", "", e.body ?? {}), after: [] };
  const extension = e.kind === "vllm" && e.api === "worker-extension";
  // Older vLLM's /pause knows no mode and aborts every request: the extension is paused only when asked.
  const pause = e.pause ?? (extension ? "none" : DEFAULT_PAUSE[e.kind]);
  const paused = pause !== "none";
  if (e.kind === "sglang") {
    const body = {
      serialized_named_tensors: Array.from({ length: e.gpus.length }, () => SGLANG_EMPTY_PAYLOAD),
      load_format: e.loadFormat ?? "ckptd.sglang.custom_weight_loader",
      flush_cache: pause === "abort",
      abort_all_requests: false,
      disable_draft_model: true,
    };
    const version = post("version", "/update_weight_version", { new_version: u.version, abort_all_requests: false });
    return {
      before: paused ? [post("pause", "/pause_generation", { mode: pause })] : [],
      receive: post("update", "/update_weights_from_tensor", body),
      after: [version, ...(paused ? [post("resume", "/continue_generation", {})] : [])],
    };
  }
  const pauseCall = paused ? [post("pause", `/pause?mode=${pause}`)] : [];
  const reset = post("reset_prefix_cache", "/reset_prefix_cache?reset_running_requests=true");
  const resume = paused ? [post("resume", "/resume")] : [];
  if (extension) {
    const kwargs = { timeout_s: String(seconds), reload: e.reload ?? "auto", update: u.update };
    return {
      before: pauseCall,
      receive: post("update", "/collective_rpc", {
        method: "ckptd_update",
        args: [u.socketDir],
        kwargs,
        timeout: seconds * 4,
      }),
      after: [reset, ...resume],
    };
  }
  const initInfo = { socket_dir: u.socketDir, timeout_s: seconds, reload: e.reload ?? "auto" };
  return {
    before: [
      post("init", "/init_weight_transfer_engine", { init_info: initInfo }),
      ...pauseCall,
      post("start", "/start_weight_update"),
    ],
    receive: post("update", "/update_weights", { update_info: { update: u.update } }),
    after: [post("finish", "/finish_weight_update", { weight_version: u.version }), reset, ...resume],
  };
}

/**
 * How buckets are packed for these engines: "auto" is layer order when a vLLM engine may take
 * updates through its layerwise reload (it holds copies until each layer is complete: in size
 * order no layer would complete before the end), else largest first.
 */
export function bucketOrderFor(order: "auto" | BucketOrder, engines: EngineConfig[]): BucketOrder {
  if (order !== "auto") return order;
  return engines.some((e) => e.kind === "vllm" && e.reload !== "direct") ? "layers" : "size";
}

/** What an engine's steps came to so far, for recovery. */
export interface Progress {
  /** Steps that succeeded. */
  done: ReadonlySet<string>;
  /** Steps the engine answered with a failure. */
  refused: ReadonlySet<string>;
  /** Steps sent but never answered (a time limit, a dropped connection): they may have happened. */
  unanswered: ReadonlySet<string>;
  /** What the engine's receivers took of the update: where any, it holds new weights, all or some. */
  took: "none" | "part" | "all";
}

/**
 * What to call after a failure: close an update the engine opened or may have opened (vLLM
 * then finishes its layerwise reload, keeping what loaded), unless its update call was
 * refused (vLLM's worker closes the update itself then); where it took any of the new
 * weights, reset its prefix cache (what it cached was computed with other weights) and label
 * what it holds (`<version>+partial` when it took part); then resume it on whatever it holds,
 * also when its pause was never answered. Calls that already happened are not repeated.
 */
export function recoveryCalls(plan: EnginePlan, p: Progress, version: string): Call[] {
  const happened = (step: string) => p.done.has(step) || p.unanswered.has(step);
  const calls: Call[] = [];
  if (happened("start") && !p.done.has("finish") && !p.refused.has("update")) {
    calls.push(post("finish", "/finish_weight_update", {}));
  }
  if (p.took !== "none") {
    const reset = plan.after.find((c) => c.step === "reset_prefix_cache");
    if (reset && !p.done.has(reset.step)) calls.push(reset);
    const versioned = plan.after.some((c) => c.step === "finish" || c.step === "version");
    if (versioned && !p.done.has("finish") && !p.done.has("version")) {
      const label = p.took === "all" ? version : `${version}+partial`;
      calls.push(post("version", "/update_weight_version", { new_version: label, abort_all_requests: false }));
    }
  }
  const resume = plan.after.find((c) => c.step === "resume");
  if (resume && happened("pause") && !p.done.has("resume")) calls.push(resume);
  return calls;
}
