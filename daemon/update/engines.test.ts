/** The configured engines' GPUs, and waiting for their receivers. */
import { describe, expect, it } from "vitest";
import type { EngineConfig } from "../config/index.ts";
import { awaitReceivers, checkEngineGpus } from "./engines.ts";
import type { Receiver, ReceiverHub } from "./receivers.ts";

const engine = (e: Partial<EngineConfig> & Pick<EngineConfig, "kind">): EngineConfig => ({
  name: "e",
  gpus: [0],
  ...e,
});

describe("checkEngineGpus", () => {
  it("refuses an engine on a GPU the host lacks, naming it and the count", () => {
    expect(() => checkEngineGpus([engine({ kind: "receiver", name: "a", gpus: [0, 1, 3] })], 2)).toThrow(
      'engine "a" is configured on GPU 3, but this host has 2 GPUs (0 to 1)',
    );
    expect(() => checkEngineGpus([engine({ kind: "receiver", name: "b", gpus: [1] })], 1)).toThrow(
      'engine "b" is configured on GPU 1, but this host has 1 GPU (GPU 0)',
    );
    expect(() => checkEngineGpus([engine({ kind: "receiver", gpus: [0, 1] })], 2)).not.toThrow();
  });
});

describe("awaitReceivers", () => {
  const hubOf = (receivers: Partial<Receiver>[]) => ({ connected: () => receivers }) as unknown as ReceiverHub;

  it("returns the connected receivers once every engine GPU has one", async () => {
    const rs = [{ gpu: 1 }, { gpu: 0 }];
    expect(await awaitReceivers(hubOf(rs), [engine({ kind: "receiver", gpus: [0, 1] })], [], 100)).toEqual(rs);
  });

  it("does not count a receiver on another GPU", async () => {
    const e = engine({ kind: "receiver", name: "trainer", gpus: [0, 1] });
    await expect(awaitReceivers(hubOf([{ gpu: 0 }]), [e], [], 50)).rejects.toThrow(
      "engine trainer has no receiver on GPU 1 after 50 ms",
    );
  });

  it("fails early with the trigger's error when the engine's call failed", async () => {
    const e = engine({ kind: "vllm", name: "vllm", gpus: [0] });
    const triggered = [{ engine: e, result: Promise.resolve("http://x answered 500: no") }];
    await expect(awaitReceivers(hubOf([]), [e], triggered, 10_000)).rejects.toThrow(
      "engine vllm has no receiver on GPU 0: http://x answered 500: no",
    );
  });

  it("stops with the abort reason", async () => {
    const ac = new AbortController();
    ac.abort("update cancelled");
    await expect(awaitReceivers(hubOf([]), [engine({ kind: "receiver" })], [], 10_000, ac.signal)).rejects.toThrow(
      "update cancelled",
    );
  });
});
