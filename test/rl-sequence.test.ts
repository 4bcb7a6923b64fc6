/**
 * The RL update sequence the daemon drives for vLLM and SGLang engines (engines/plan.ts),
 * against stand-in servers of their HTTP routes whose receivers are real reference receivers
 * on the daemon's sockets (host backend): the calls in order, every byte delivered, the weight
 * version set, and after a failure at each step the engine resumed and the result saying what
 * it holds.
 */
import { tmpdir } from "node:os";
import { afterEach, describe, expect, it } from "vitest";
import type { Config, EngineConfig } from "../daemon/config/index.ts";
import { ckptHash, type WrittenTensor, writeModel } from "./checkpoint-files.ts";
import { tempDir } from "./helpers.ts";
import { apiOf, startInProcess, testConfig } from "./in-process.ts";
import { StandInEngine } from "./stand-in-engine.ts";

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function setup(
  kind: "vllm" | "sglang",
  engine: Partial<EngineConfig> = {},
  gpus = [0, 1],
  extra: Partial<Config> = {},
  model: (dir: string) => WrittenTensor[] = (dir) => writeModel(dir, 2, 2, 256),
) {
  const socketDir = tempDir();
  const stand = await new StandInEngine(kind, gpus, socketDir).listen();
  cleanup.push(() => stand.close());
  const config: Config = testConfig({
    hostDevices: 2,
    socketDir,
    registerRoots: ["/dev/shm", tmpdir()],
    bucketBytes: 1 << 16,
    bucketSlots: 3,
    receiverTimeoutMs: 3000,
    engines: [{ name: `${kind}-0`, kind, url: stand.url, gpus, ...engine }],
    ...extra,
  });
  const daemon = await startInProcess(config);
  cleanup.push(() => daemon.stop());
  const api = apiOf(daemon.port);
  const dir = tempDir();
  const tensors = model(dir);
  expect((await api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
  return { stand, api, tensors };
}

async function expectDelivered(stand: StandInEngine, update: string, tensors: WrittenTensor[]) {
  for (const r of stand.receivers) {
    const got = r.hashes.get(update);
    expect(got?.size, r.name).toBe(tensors.length);
    for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
  }
}

const VERSION = /^m@1\+[0-9a-f]{16}$/;

describe("vLLM (weight transfer API)", () => {
  it("inits, pauses, opens the update, pushes, finishes with the version, resets the cache, resumes", async () => {
    const { stand, api, tensors } = await setup("vllm");
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.body.state).toBe("succeeded");
    expect(stand.paths()).toEqual([
      "/init_weight_transfer_engine",
      "/pause?mode=keep",
      "/start_weight_update",
      "/update_weights",
      "/finish_weight_update",
      "/reset_prefix_cache?reset_running_requests=true",
      "/resume",
    ]);
    await expectDelivered(stand, "u-1", tensors);
    expect(stand.version).toMatch(VERSION);
    expect(res.body.weightVersion).toBe(stand.version);
    expect([stand.paused, stand.open, stand.cacheResets]).toEqual([false, false, 1]);
    expect(res.body.engines).toEqual([
      {
        name: "vllm-0",
        kind: "vllm",
        steps: expect.arrayContaining([expect.objectContaining({ step: "finish", ok: true })]),
      },
    ]);
    expect(stand.receivers.map((r) => r.name)).toEqual(["vllm-rank0", "vllm-rank1"]);

    // the receivers stay connected: the next update calls init again and reuses them
    const again = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(again.body.state).toBe("succeeded");
    await expectDelivered(stand, "u-2", tensors);
    expect(stand.receivers).toHaveLength(2);
  });

  it("a pause that fails stops the update before any byte moves; nothing to resume", async () => {
    const { stand, api } = await setup("vllm", { pause: "wait" });
    stand.failures.set("/pause", 400);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toBe(
      `engine vllm-0: pause failed: ${stand.url}/pause?mode=wait answered 400: injected failure of /pause; ` +
        "engine vllm-0 took none of the update, not paused",
    );
    expect(stand.paths()).toEqual(["/init_weight_transfer_engine", "/pause?mode=wait"]);
    expect(stand.receivers.every((r) => !r.seen.some((m) => m.op === "begin"))).toBe(true);
  });

  it("a start that fails resumes the engine on its previous weights", async () => {
    const { stand, api } = await setup("vllm");
    stand.failures.set("/start_weight_update", 409);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^engine vllm-0: start failed: .* answered 409: .*; engine vllm-0 took none of the update, resumed$/,
    );
    expect(stand.paths().slice(-1)).toEqual(["/resume"]);
    expect(stand.paused).toBe(false);
    expect(res.body.error.details.engines[0].resumed).toBe(true);
  });

  it("an update_weights that fails aborts the push, closes the update and resumes", async () => {
    const { stand, api } = await setup("vllm");
    stand.failures.set("/update_weights", 500);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^engine vllm-0: .*\/update_weights answered 500: injected failure of \/update_weights;/,
    );
    expect(res.body.error.message).toMatch(/engine vllm-0 took (none|part|all) of the update.*, resumed$/);
    expect(stand.paths().slice(-1)).toEqual(["/resume"]); // vLLM closed its update when update_weights failed
    // the stand-in's receivers acked what came before the abort: then what it holds is labelled partial
    expect(stand.version === undefined || stand.version.endsWith("+partial")).toBe(true);
    expect([stand.paused, stand.open]).toEqual([false, false]);
  });

  it("a receiver that fails: the engine's update is closed with no version and it is resumed", async () => {
    const { stand, api } = await setup("vllm");
    const res0 = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res0.body.state).toBe("succeeded");
    const first = stand.version;
    for (const r of stand.receivers) r.behaviour = { failFrom: 0 };
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^receiver vllm-rank[01] .* injected failure at bucket \d; engine vllm-0 took none of the update, resumed$/,
    );
    expect(stand.version).toBe(first); // still the version of what it held before
    expect(stand.paths().slice(-2)).toEqual(["/update_weights", "/resume"]);
    expect(stand.paused).toBe(false);
  });

  it("a finish that fails after every byte arrived says the engine holds the whole update, resumed", async () => {
    const { stand, api, tensors } = await setup("vllm");
    stand.failures.set("/finish_weight_update", 500);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^engine vllm-0: finish failed: .*; engine vllm-0 took all of the update, resumed$/,
    );
    await expectDelivered(stand, "u-1", tensors);
    expect(stand.paths().slice(-1)).toEqual(["/resume"]);
  });

  it("after a failure, waits for the engine's update_weights to answer before finishing it", async () => {
    const { stand, api } = await setup("vllm");
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
    stand.answerDelayMs = 400; // vLLM answers update_weights once every worker's receive returned
    stand.answerOk = true; // as if each worker's receive had returned without raising
    (stand.receivers[0] as (typeof stand.receivers)[number]).behaviour = { failAt: 0 };
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(stand.raced).toBe(false);
    const steps = res.body.error.details.engines[0].steps.map((s: { step: string; ok: boolean }) => [s.step, s.ok]);
    expect(steps.slice(0, 5)).toEqual([
      ["init", true],
      ["pause", true],
      ["start", true],
      ["update", true],
      ["finish", true],
    ]);
    expect(steps.at(-1)).toEqual(["resume", true]);
  });

  it("with bucketOrder layers, buckets come in layer order (for layerwise reload)", async () => {
    const layerOf = (name: string) => Number(/\.layers\.(\d+)\./.exec(name)?.[1] ?? -1);
    const order = async (bucketOrder: "size" | "layers") => {
      const { stand, api } = await setup(
        "vllm",
        {},
        [0],
        { hostDevices: 1, bucketOrder, bucketBytes: 1 << 20 },
        (dir) => writeModel(dir, 1, 12, 256),
      );
      expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
      const buckets = (stand.receivers[0] as (typeof stand.receivers)[number]).seen.filter((m) => m.op === "bucket");
      expect(buckets.length).toBeGreaterThan(2);
      // in plan order (buckets in flight at once may reach a receiver out of order)
      buckets.sort((a, b) => (a.bucket as number) - (b.bucket as number));
      return buckets.flatMap((b) => (b.tensors as { name: string }[]).map((t) => layerOf(t.name)));
    };
    const layered = await order("layers");
    expect(layered.join(" ")).toBe([...layered].sort((a, b) => a - b).join(" "));
    const sized = await order("size");
    expect(sized).not.toEqual([...sized].sort((a, b) => a - b));
  });

  it("a resume that fails is said plainly", async () => {
    const { stand, api } = await setup("vllm");
    stand.failures.set("/resume", 503);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^engine vllm-0: resume failed: .*; engine vllm-0 took all of the update, NOT resumed \(its resume call failed\)$/,
    );
  });
});

describe("SGLang", () => {
  it("pauses, pushes through update_weights_from_tensor, sets the version, continues", async () => {
    const { stand, api, tensors } = await setup("sglang", { pause: "in_place" });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.body.state).toBe("succeeded");
    expect(stand.paths()).toEqual([
      "/pause_generation",
      "/update_weights_from_tensor",
      "/update_weight_version",
      "/continue_generation",
    ]);
    expect(stand.calls[0]?.body).toEqual({ mode: "in_place" });
    expect(stand.calls[1]?.body).toMatchObject({ flush_cache: false, disable_draft_model: true });
    expect(stand.calls[1]?.body).toMatchObject({ serialized_named_tensors: [expect.any(String), expect.any(String)] });
    await expectDelivered(stand, "u-1", tensors);
    expect(stand.version).toMatch(VERSION);
    expect(stand.paused).toBe(false);
    expect(stand.crashed).toBe(false);
  });

  it("a rank that never connects: the ranks that did, waiting in their loaders, are told the update failed", async () => {
    const { stand, api } = await setup("sglang", { gpus: [0, 1] }, [0]);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^engine sglang-0 has no receiver on GPU 1 after 3000 ms; engine sglang-0 took none of the update, resumed$/,
    );
    const rank0 = stand.receivers[0] as (typeof stand.receivers)[number];
    expect(rank0.seen.filter((m) => m.op === "abort").map((m) => m.update)).toEqual(["u-1"]);
    expect(res.body.error.details.engines[0].steps.find((s: { step: string }) => s.step === "update")?.ok).toBe(true);
  });

  it("flushes the cache only after an abort pause, the default (SGLang asserts on a failed flush)", async () => {
    for (const pause of [undefined, "retract"] as const) {
      const { stand, api } = await setup("sglang", pause ? { pause } : {});
      expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");
      expect(stand.crashed).toBe(false);
      expect([stand.pauseMode, stand.cacheResets]).toEqual(pause ? ["retract", 0] : ["abort", 1]);
    }
  });

  it("a rank whose loader failed (SGLang still answers success) fails the update, labelled partial", async () => {
    const { stand, api } = await setup("sglang");
    const ok = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(ok.body.state).toBe("succeeded");
    const before = stand.version;
    (stand.receivers[0] as (typeof stand.receivers)[number]).behaviour = { failAt: 1 };
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(
      /^receiver sglang-rank0 .* injected failure at bucket 1; engine sglang-0 took part of the update \((1|1 to 2) of 2 buckets acked per rank\), resumed$/,
    );
    expect(before).toMatch(VERSION);
    expect(stand.version).toBe(`${before}+partial`); // what it holds now is said, not the last version
    expect(stand.paths().slice(-3)).toEqual([
      "/update_weights_from_tensor",
      "/update_weight_version",
      "/continue_generation",
    ]);
    expect(stand.paused).toBe(false);
  });
});
