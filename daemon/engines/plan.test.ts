/** The RL sequence as data: each engine kind's calls, and what a failure calls. */
import { describe, expect, it } from "vitest";
import type { EngineConfig } from "../config/index.ts";
import { bucketOrderFor, planEngine, recoveryCalls, SGLANG_EMPTY_PAYLOAD } from "./plan.ts";

const facts = {
  update: "u-7",
  version: "m@3+00112233aabbccdd",
  socketDir: "/var/lib/ckptd/sockets",
  receiverTimeoutMs: 30_000,
};
const engine = (e: Partial<EngineConfig> & Pick<EngineConfig, "kind">): EngineConfig => ({
  name: "e",
  url: "http://127.0.0.1:8000",
  gpus: [0, 1],
  ...e,
});
const steps = (calls: { step: string; path: string }[]) => calls.map((c) => `${c.step} ${c.path}`);

describe("planEngine", () => {
  it("vLLM's weight transfer API: init, pause, start; update_weights; finish with the version, reset, resume", () => {
    const p = planEngine(engine({ kind: "vllm" }), facts);
    expect(steps(p.before)).toEqual([
      "init /init_weight_transfer_engine",
      "pause /pause?mode=keep",
      "start /start_weight_update",
    ]);
    expect(p.before[0]?.body).toEqual({
      init_info: { socket_dir: "/var/lib/ckptd/sockets", timeout_s: 30, reload: "auto" },
    });
    expect(p.before[2]?.body).toBeUndefined();
    expect(p.receive).toEqual({
      step: "update",
      method: "POST",
      path: "/update_weights",
      body: { update_info: { update: "u-7" } },
    });
    expect(steps(p.after)).toEqual([
      "finish /finish_weight_update",
      "reset_prefix_cache /reset_prefix_cache?reset_running_requests=true",
      "resume /resume",
    ]);
    expect(p.after[0]?.body).toEqual({ weight_version: "m@3+00112233aabbccdd" });
  });

  it("the pause mode and reload come from the configuration; none pauses nothing", () => {
    const wait = planEngine(engine({ kind: "vllm", pause: "wait", reload: "layerwise" }), facts);
    expect(wait.before[1]?.path).toBe("/pause?mode=wait");
    expect(wait.before[0]?.body).toMatchObject({ init_info: { reload: "layerwise" } });
    const none = planEngine(engine({ kind: "vllm", pause: "none" }), facts);
    expect(steps(none.before)).toEqual(["init /init_weight_transfer_engine", "start /start_weight_update"]);
    expect(none.after.map((c) => c.step)).toEqual(["finish", "reset_prefix_cache"]);
  });

  it("vLLM's worker extension is not paused unless asked (older vLLM's /pause aborts every request)", () => {
    const p = planEngine(engine({ kind: "vllm", api: "worker-extension" }), facts);
    expect(p.before).toEqual([]);
    expect(p.after.map((c) => c.step)).toEqual(["reset_prefix_cache"]);
  });

  it("vLLM's worker extension: collective_rpc with string arguments, no version route", () => {
    const p = planEngine(engine({ kind: "vllm", api: "worker-extension", pause: "abort" }), facts);
    expect(steps(p.before)).toEqual(["pause /pause?mode=abort"]);
    expect(p.receive?.body).toEqual({
      method: "ckptd_update",
      args: ["/var/lib/ckptd/sockets"],
      kwargs: { timeout_s: "30", reload: "auto", update: "u-7" },
      timeout: 120,
    });
    expect(p.after.map((c) => c.step)).toEqual(["reset_prefix_cache", "resume"]);
  });

  it("SGLang: pause_generation, one empty payload per rank with the draft excluded, then the version, continue", () => {
    const p = planEngine(engine({ kind: "sglang", gpus: [2, 3, 4, 5] }), facts);
    expect(p.before).toEqual([{ step: "pause", method: "POST", path: "/pause_generation", body: { mode: "abort" } }]);
    expect(p.receive).toEqual({
      step: "update",
      method: "POST",
      path: "/update_weights_from_tensor",
      body: {
        serialized_named_tensors: [
          SGLANG_EMPTY_PAYLOAD,
          SGLANG_EMPTY_PAYLOAD,
          SGLANG_EMPTY_PAYLOAD,
          SGLANG_EMPTY_PAYLOAD,
        ],
        load_format: "ckptd.sglang.custom_weight_loader",
        flush_cache: true,
        abort_all_requests: false,
        disable_draft_model: true,
      },
    });
    expect(p.after).toEqual([
      {
        step: "version",
        method: "POST",
        path: "/update_weight_version",
        body: { new_version: "m@3+00112233aabbccdd", abort_all_requests: false },
      },
      { step: "resume", method: "POST", path: "/continue_generation", body: {} },
    ]);
  });

  it("SGLang flushes its cache only after an abort pause (otherwise the flush would fail, an assert there)", () => {
    for (const pause of ["in_place", "retract", "none"] as const) {
      const p = planEngine(engine({ kind: "sglang", pause, loadFormat: "my.loader" }), facts);
      expect(p.receive?.body, pause).toMatchObject({ flush_cache: false, load_format: "my.loader" });
    }
    expect(planEngine(engine({ kind: "sglang", pause: "in_place" }), facts).before[0]?.body).toEqual({
      mode: "in_place",
    });
  });

  it("http engines get their body, receiver engines nothing", () => {
    expect(planEngine(engine({ kind: "http", body: { go: 1 } }), facts)).toEqual({
      before: [],
      receive: { step: "trigger", method: "POST", path: "", body: { go: 1 } },
      after: [],
    });
    expect(planEngine(engine({ kind: "receiver" }), facts)).toEqual({ before: [], after: [] });
  });
});

describe("recoveryCalls", () => {
  const vllm = planEngine(engine({ kind: "vllm" }), facts);
  const V = facts.version;
  const at = (
    done: string[],
    more: { refused?: string[]; unanswered?: string[]; took?: "none" | "part" | "all" } = {},
  ) => ({
    done: new Set(done),
    refused: new Set(more.refused ?? []),
    unanswered: new Set(more.unanswered ?? []),
    took: more.took ?? "none",
  });

  it("finishes an update the engine opened, then resumes it", () => {
    expect(steps(recoveryCalls(vllm, at(["init", "pause", "start"]), V))).toEqual([
      "finish /finish_weight_update",
      "resume /resume",
    ]);
    expect(recoveryCalls(vllm, at(["pause", "start"]), V)[0]?.body).toEqual({});
  });

  it("repeats nothing that happened, and resumes only what it paused", () => {
    expect(steps(recoveryCalls(vllm, at(["init", "pause", "start", "update", "finish"]), V))).toEqual([
      "resume /resume",
    ]);
    expect(recoveryCalls(vllm, at(["init", "pause", "start", "finish", "resume"]), V)).toEqual([]);
    expect(recoveryCalls(vllm, at(["init"]), V)).toEqual([]);
    expect(recoveryCalls(vllm, at(["init"], { refused: ["pause"] }), V)).toEqual([]);
    const sglang = planEngine(engine({ kind: "sglang" }), facts);
    expect(steps(recoveryCalls(sglang, at(["pause"]), V))).toEqual(["resume /continue_generation"]);
  });

  it("an update call the engine refused was closed there (vLLM's worker does): no finish", () => {
    expect(steps(recoveryCalls(vllm, at(["init", "pause", "start"], { refused: ["update"] }), V))).toEqual([
      "resume /resume",
    ]);
  });

  it("a pause or a start that was never answered may have happened: resume, finish", () => {
    expect(steps(recoveryCalls(vllm, at(["init"], { unanswered: ["pause"] }), V))).toEqual(["resume /resume"]);
    expect(steps(recoveryCalls(vllm, at(["init", "pause"], { unanswered: ["start"] }), V))).toEqual([
      "finish /finish_weight_update",
      "resume /resume",
    ]);
  });

  it("an engine that took new weights gets its prefix cache reset and a label saying what it holds", () => {
    const part = recoveryCalls(vllm, at(["init", "pause", "start"], { took: "part" }), V);
    expect(steps(part)).toEqual([
      "finish /finish_weight_update",
      "reset_prefix_cache /reset_prefix_cache?reset_running_requests=true",
      "version /update_weight_version",
      "resume /resume",
    ]);
    expect(part[2]?.body).toEqual({ new_version: `${V}+partial`, abort_all_requests: false });
    const all = recoveryCalls(vllm, at(["init", "pause", "start", "update"], { took: "all", refused: ["finish"] }), V);
    expect(all.find((c) => c.step === "version")?.body).toEqual({ new_version: V, abort_all_requests: false });
    // SGLang: no cache reset route of its own here; the label still
    const sglang = planEngine(engine({ kind: "sglang" }), facts);
    expect(steps(recoveryCalls(sglang, at(["pause"], { took: "part" }), V))).toEqual([
      "version /update_weight_version",
      "resume /continue_generation",
    ]);
    // the worker extension's vLLM has no version route: only the reset
    const ext = planEngine(engine({ kind: "vllm", api: "worker-extension", pause: "keep" }), facts);
    expect(steps(recoveryCalls(ext, at(["pause"], { took: "part" }), V))).toEqual([
      "reset_prefix_cache /reset_prefix_cache?reset_running_requests=true",
      "resume /resume",
    ]);
  });
});

describe("bucketOrderFor", () => {
  it("auto: layer order when a vLLM engine may reload layer by layer, else largest first", () => {
    expect(bucketOrderFor("auto", [engine({ kind: "vllm" })])).toBe("layers");
    expect(bucketOrderFor("auto", [engine({ kind: "vllm", reload: "direct" }), engine({ kind: "sglang" })])).toBe(
      "size",
    );
    expect(bucketOrderFor("auto", [])).toBe("size");
    expect(bucketOrderFor("size", [engine({ kind: "vllm" })])).toBe("size");
    expect(bucketOrderFor("layers", [])).toBe("layers");
  });
});
