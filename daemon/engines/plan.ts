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
 *   passed in the request after a failed update too. With `in_place` the running requests keep
 *   their KV cache, and SGLang asserts (killing the server) if a flush is asked then: no flush
 *   for that mode.
 * http: the configured body to the configured url, nothing around it.
 */
import type { EngineConfig } from "../config/index.ts";

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
export const DEFAULT_PAUSE = { vllm: "keep", sglang: "retract" } as const;

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
  const pause = e.pause ?? DEFAULT_PAUSE[e.kind];
  const paused = pause !== "none";
  if (e.kind === "sglang") {
    const body = {
      serialized_named_tensors: Array.from({ length: e.gpus.length }, () => SGLANG_EMPTY_PAYLOAD),
      load_format: e.loadFormat ?? "ckptd.sglang.custom_weight_loader",
      flush_cache: pause !== "in_place",
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
  if ((e.api ?? "weight-transfer") === "worker-extension") {
    const kwargs = { timeout_s: String(seconds), reload: e.reload ?? "auto" };
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
 * What to call after a failure, given the steps that succeeded (`done`) and those the engine
 * answered with a failure (`refused`): close an update the engine opened (vLLM then finishes
 * its layerwise reload, keeping what loaded), unless its update call failed there (vLLM's
 * worker closes the update itself then), and resume it on whatever it holds. Calls that
 * already happened are not repeated.
 */
export function recoveryCalls(
  plan: EnginePlan,
  done: ReadonlySet<string>,
  refused: ReadonlySet<string> = new Set(),
): Call[] {
  const calls: Call[] = [];
  if (done.has("start") && !done.has("finish") && !refused.has("update")) {
    calls.push(post("finish", "/finish_weight_update", {}));
  }
  const resume = plan.after.find((c) => c.step === "resume");
  if (done.has("pause") && !done.has("resume") && resume) calls.push(resume);
  return calls;
}
