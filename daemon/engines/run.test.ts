/** Making an engine's calls: answers read as failures or successes, steps recorded, recovery. */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { EngineConfig } from "../config/index.ts";
import { planEngine } from "./plan.ts";
import { EngineRun, failureIn } from "./run.ts";

interface Seen {
  method?: string;
  url?: string;
  contentType?: string;
  body: unknown;
}

const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
});

/** An HTTP server answering each request with `answer(path)`; `seen` lists what it got. */
async function engineServer(answer: (res: ServerResponse, path: string) => void) {
  const seen: Seen[] = [];
  const server = createServer((req: IncomingMessage, res) => {
    let body = "";
    req.on("data", (c) => {
      body += c;
    });
    req.on("end", () => {
      seen.push({
        method: req.method,
        url: req.url,
        contentType: req.headers["content-type"],
        body: body ? JSON.parse(body) : undefined,
      });
      answer(res, req.url ?? "");
    });
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { url, seen };
}

const reply = (status: number, text: string) => (res: ServerResponse) => {
  res.writeHead(status);
  res.end(text);
};

const facts = { update: "u-3", version: "m@2+0123456789abcdef", socketDir: "/s", receiverTimeoutMs: 1000 };
const engine = (e: Partial<EngineConfig> & Pick<EngineConfig, "kind">): EngineConfig => ({
  name: "e",
  gpus: [0],
  ...e,
});
const runOf = (e: EngineConfig, callMs = 1000, pauseMs = 1000) =>
  new EngineRun(e, planEngine(e, facts), { callMs, pauseMs });

describe("failureIn", () => {
  it("reads SGLang's success: false and the ckptd extension's worker results", () => {
    expect(failureIn('{"success": false, "message": "Unknown load_format"}')).toBe(
      "the engine answered success: false: Unknown load_format",
    );
    expect(failureIn('{"success": false, "message": {"deep": 1}}')).toBe(
      'the engine answered success: false: {"deep":1}',
    );
    expect(failureIn(JSON.stringify({ results: [{ ok: true }, { ok: false, error: "OOM" }] }))).toBe(
      "a worker failed: OOM",
    );
    expect(failureIn(JSON.stringify({ results: [null, { ok: false }] }))).toBe('a worker failed: {"ok":false}');
  });

  it("takes any other answer as success (not JSON, null, a message, results that are not a list)", () => {
    for (const text of [
      "OK",
      "null",
      "7",
      "{}",
      '{"success": true}',
      '{"message": "Weights updated"}',
      '{"results": "all fine"}',
    ]) {
      expect(failureIn(text), text).toBeUndefined();
    }
  });
});

describe("EngineRun", () => {
  it("makes a vLLM engine's calls in order and records each step", async () => {
    const { url, seen } = await engineServer(reply(200, "{}"));
    const run = runOf(engine({ kind: "vllm", url: `${url}/`, name: "v" }));
    await run.before();
    expect(await run.receive()).toBeUndefined();
    await run.after();
    expect(seen.map((s) => [s.method, s.url])).toEqual([
      ["POST", "/init_weight_transfer_engine"],
      ["POST", "/pause?mode=keep"],
      ["POST", "/start_weight_update"],
      ["POST", "/update_weights"],
      ["POST", "/finish_weight_update"],
      ["POST", "/reset_prefix_cache?reset_running_requests=true"],
      ["POST", "/resume"],
    ]);
    expect(seen[0]?.contentType).toBe("application/json");
    expect(seen[4]?.body).toEqual({ weight_version: "m@2+0123456789abcdef" });
    expect(run.result.steps.map((s) => [s.step, s.ok])).toEqual([
      ["init", true],
      ["pause", true],
      ["start", true],
      ["update", true],
      ["finish", true],
      ["reset_prefix_cache", true],
      ["resume", true],
    ]);
    expect(run.result.steps.every((s) => Number.isInteger(s.ms) && s.ms >= 0)).toBe(true);
  });

  it("stops at the first failing step, naming the engine and the step, then resumes on recovery", async () => {
    const { url, seen } = await engineServer((res, path) =>
      reply(
        path.startsWith("/start") ? 409 : 200,
        path.startsWith("/start") ? "a weight update is already in progress" : "{}",
      )(res),
    );
    const run = runOf(engine({ kind: "vllm", url, name: "v" }));
    await expect(run.before()).rejects.toThrow(
      `engine v: start failed: ${url}/start_weight_update answered 409: a weight update is already in progress`,
    );
    await run.recover("none", facts.version);
    expect(seen.map((s) => s.url)).toEqual([
      "/init_weight_transfer_engine",
      "/pause?mode=keep",
      "/start_weight_update",
      "/resume",
    ]);
    expect(run.result.resumed).toBe(true);
    expect(run.describe()).toBe("resumed");
    expect(run.result.steps.at(2)).toMatchObject({ step: "start", ok: false });
  });

  it("after a failure elsewhere with the update open, finishes it (no version) before resuming", async () => {
    const { url, seen } = await engineServer(reply(200, "{}"));
    const run = runOf(engine({ kind: "vllm", url }));
    await run.before();
    await run.recover("none", facts.version);
    expect(seen.slice(3).map((s) => [s.url, s.body])).toEqual([
      ["/finish_weight_update", {}],
      ["/resume", undefined],
    ]);
  });

  it("an update call the engine refused closed the update there: only resume", async () => {
    const { url, seen } = await engineServer((res, path) => reply(path === "/update_weights" ? 500 : 200, "{}")(res));
    const run = runOf(engine({ kind: "vllm", url }));
    await run.before();
    expect(await run.receive()).toBe(`${url}/update_weights answered 500: {}`);
    await run.recover("none", facts.version);
    expect(seen.slice(4).map((s) => s.url)).toEqual(["/resume"]);
  });

  it("the update call has no time limit; the others have theirs", async () => {
    const { url, seen } = await engineServer((res, path) =>
      path === "/update_weights" ? setTimeout(() => reply(200, "{}")(res), 300) : reply(200, "{}")(res),
    );
    const run = runOf(engine({ kind: "vllm", url }), 100);
    await run.before();
    const receiving = run.receive(); // no time limit of its own: the receivers' acks bound an update
    await new Promise((r) => setTimeout(r, 200));
    expect(seen.map((s) => s.url)).not.toContain("/finish_weight_update");
    expect(await receiving).toBeUndefined();
    expect(run.result.steps.at(-1)).toMatchObject({ step: "update", ok: true });
  });

  it("says when the resume itself failed", async () => {
    const { url } = await engineServer((res, path) => reply(path === "/continue_generation" ? 503 : 200, "down")(res));
    const run = runOf(engine({ kind: "sglang", url }));
    await run.before();
    await run.recover("none", facts.version);
    expect(run.result.resumed).toBe(false);
    expect(run.describe()).toBe("NOT resumed (its resume call failed)");
  });

  it("calls nothing around an engine that was not paused", async () => {
    const { url, seen } = await engineServer(reply(200, "{}"));
    const run = runOf(engine({ kind: "sglang", url, pause: "none" }));
    await run.before();
    await run.recover("none", facts.version);
    expect(seen).toEqual([]);
    expect(run.describe()).toBe("");
    expect(run.result.resumed).toBe(true);
  });

  it("posts an http engine's configured body to its url as it is", async () => {
    const { url, seen } = await engineServer(reply(200, "done"));
    expect(
      await runOf(engine({ kind: "http", url: `${url}/hooks/update/`, body: { go: 1 } })).receive(),
    ).toBeUndefined();
    expect(await runOf(engine({ kind: "http", url })).receive()).toBeUndefined();
    expect(seen.map((s) => [s.url, s.body])).toEqual([
      ["/hooks/update/", { go: 1 }],
      ["/", {}],
    ]);
  });

  it("a receiver engine makes no call", async () => {
    const run = runOf(engine({ kind: "receiver" }));
    await run.before();
    expect(await run.receive()).toBeUndefined();
    await run.after();
    expect(run.result.steps).toEqual([]);
  });

  it("reports an error status with the first 300 characters of the answer", async () => {
    const { url } = await engineServer(reply(503, `busy${"x".repeat(1000)}`));
    expect(await runOf(engine({ kind: "http", url })).receive()).toBe(`${url} answered 503: busy${"x".repeat(296)}`);
  });

  it("a pause that is never answered may have happened: the engine is resumed, and said to be", async () => {
    const { url, seen } = await engineServer((res, path) =>
      path.startsWith("/pause") ? setTimeout(() => reply(200, "{}")(res), 300) : reply(200, "{}")(res),
    );
    const run = runOf(engine({ kind: "vllm", url, pause: "wait" }), 1000, 100);
    await expect(run.before()).rejects.toThrow(
      `engine e: pause failed: ${url}/pause?mode=wait did not answer within 100 ms`,
    );
    await run.recover("none", facts.version);
    expect(seen.map((s) => s.url)).toEqual(["/init_weight_transfer_engine", "/pause?mode=wait", "/resume"]);
    expect(run.describe()).toBe("resumed");
  });

  it("waits for a slow engine up to its time limit, and names the limit past it", async () => {
    const { url } = await engineServer((res) => setTimeout(() => reply(200, "{}")(res), 150));
    await runOf(engine({ kind: "sglang", url }), 1000, 1000).before();
    await expect(runOf(engine({ kind: "sglang", url }), 1000, 50).before()).rejects.toThrow(
      `engine e: pause failed: ${url}/pause_generation did not answer within 50 ms`,
    );
    const slowStart = runOf(engine({ kind: "vllm", url, pause: "none", reload: "direct" }), 50);
    await expect(slowStart.before()).rejects.toThrow(`${url}/init_weight_transfer_engine did not answer within 50 ms`);
  });

  it("resolves to a message naming the url when the engine cannot be reached", async () => {
    const { url } = await engineServer(reply(200, "{}"));
    const dead = servers.pop() as Server;
    await new Promise((r) => dead.close(r));
    expect(await runOf(engine({ kind: "vllm", url, api: "worker-extension" })).receive()).toBe(
      `${url}/collective_rpc: fetch failed`,
    );
  });
});
