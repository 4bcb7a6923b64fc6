/** Triggering configured engines over HTTP, and waiting for their receivers. */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { EngineConfig } from "../config/index.ts";
import { awaitReceivers, checkEngineGpus, triggerEngines } from "./engines.ts";
import type { Receiver, ReceiverHub } from "./receivers.ts";

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

/** An HTTP server answering every request with `answer`; `seen` lists what it got. */
async function engineServer(answer: (res: ServerResponse) => void) {
  const seen: Seen[] = [];
  const server = createServer((req: IncomingMessage, res) => {
    let body = "";
    req.on("data", (c) => {
      body += c;
    });
    req.on("end", () => {
      seen.push({ method: req.method, url: req.url, contentType: req.headers["content-type"], body: JSON.parse(body) });
      answer(res);
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

const engine = (e: Partial<EngineConfig> & Pick<EngineConfig, "kind">): EngineConfig => ({
  name: "e",
  gpus: [0],
  ...e,
});

describe("triggerEngines", () => {
  it("calls vLLM's collective_rpc with the socket dir and the timeout in seconds", async () => {
    const { url, seen } = await engineServer(reply(200, JSON.stringify({ results: [{ ok: true }, { ok: true }] })));
    const [t, ...rest] = triggerEngines(
      [engine({ kind: "vllm", url: `${url}/` }), engine({ kind: "receiver" })],
      "/run/ckptd/sockets",
      30_000,
    );
    expect(rest).toEqual([]);
    expect(await t?.result).toBeUndefined();
    expect(seen).toEqual([
      {
        method: "POST",
        url: "/collective_rpc",
        contentType: "application/json",
        body: { method: "ckptd_update", args: ["/run/ckptd/sockets"], kwargs: {}, timeout: 30 },
      },
    ]);
  });

  it("posts an http engine's configured body to its url as it is", async () => {
    const { url, seen } = await engineServer(reply(200, "done"));
    const [a, b] = triggerEngines(
      [engine({ kind: "http", url: `${url}/hooks/update/`, body: { go: 1 } }), engine({ kind: "http", url })],
      "/s",
      1000,
    );
    expect(await a?.result).toBeUndefined();
    expect(await b?.result).toBeUndefined();
    expect(seen.map((s) => [s.url, s.contentType, s.body])).toEqual(
      expect.arrayContaining([
        ["/hooks/update/", "application/json", { go: 1 }],
        ["/", "application/json", {}],
      ]),
    );
  });

  it("names a failing worker by its error, or by the whole answer", async () => {
    const withError = await engineServer(
      reply(200, JSON.stringify({ results: [{ ok: true }, { ok: false, error: "OOM" }] })),
    );
    const bare = await engineServer(reply(200, JSON.stringify({ results: [null, { ok: false }] })));
    const [a, b] = triggerEngines(
      [engine({ kind: "vllm", url: withError.url }), engine({ kind: "vllm", url: bare.url })],
      "/s",
      1000,
    );
    expect(await a?.result).toBe("a worker failed: OOM");
    expect(await b?.result).toBe('a worker failed: {"ok":false}');
  });

  it("takes any answer but an explicit failure as success (not JSON, null, no results)", async () => {
    for (const text of ["OK", "null", "{}", '{"results": "all fine"}']) {
      const { url } = await engineServer(reply(200, text));
      const [t] = triggerEngines([engine({ kind: "http", url })], "/s", 1000);
      expect(await t?.result, text).toBeUndefined();
    }
  });

  it("reports an error status with the first 300 characters of the answer", async () => {
    const { url } = await engineServer(reply(503, `busy${"x".repeat(1000)}`));
    const [t] = triggerEngines([engine({ kind: "http", url })], "/s", 1000);
    expect(await t?.result).toBe(`${url} answered 503: busy${"x".repeat(296)}`);
  });

  it("waits for a slow engine up to four times the update timeout", async () => {
    const { url } = await engineServer((res) => setTimeout(() => reply(200, "{}")(res), 150));
    const [t] = triggerEngines([engine({ kind: "http", url })], "/s", 100);
    expect(await t?.result).toBeUndefined();
  });

  it("resolves to a message naming the url when the engine cannot be reached", async () => {
    const { url } = await engineServer(reply(200, "{}"));
    const dead = servers.pop() as Server;
    await new Promise((r) => dead.close(r));
    const [t] = triggerEngines([engine({ kind: "vllm", url })], "/s", 1000);
    expect(await t?.result).toBe(`${url}/collective_rpc: fetch failed`);
  });
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
