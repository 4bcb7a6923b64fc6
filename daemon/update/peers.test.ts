import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { within } from "../../test/helpers.ts";
import { type PeerPlan, type PeerSigner, peerAbort, peerInfo, peerRun } from "./peers.ts";

interface Seen {
  method?: string;
  url?: string;
  headers: IncomingMessage["headers"];
  body: string;
}

const servers: Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
});

/** A peer that records each request and answers `status` with `body` (or never, when body is undefined). */
async function fakePeer(status: number, body?: string): Promise<{ url: string; seen: Seen[] }> {
  const seen: Seen[] = [];
  const server = createServer((req, res) => {
    let text = "";
    req.on("data", (c) => {
      text += c;
    });
    req.on("end", () => {
      seen.push({ method: req.method, url: req.url, headers: req.headers, body: text });
      if (body !== undefined) res.writeHead(status, { "content-type": "application/json" }).end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  servers.push(server);
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen };
}

/** A signer that names what it signed, so the test sees it reach the peer; it takes every answer as signed. */
const signed: { method: string; url: string; to: string; body?: string }[] = [];
const signer = (answered: PeerSigner["answered"]): PeerSigner =>
  Object.assign(
    (method: string, url: string, to: string, body?: Uint8Array) => {
      signed.push({ method, url, to, body: body && new TextDecoder().decode(body) });
      return { "x-test-signature": `${method} ${url} for ${to}` };
    },
    { answered },
  );
const sign = signer(() => true);

const plan: PeerPlan = {
  update: "u-3",
  coordinator: "node-a",
  checkpoint: { name: "m", fingerprint: "ab" },
  comm: { key: "k", id: "00ff", fresh: true, nranks: 2 },
  firstRank: 1,
  slots: 4,
  slotBytes: 1024,
  buckets: [],
};

describe("answers", () => {
  it("an answer without the cluster secret's signature counts as none (whoever answers there is no daemon of ours)", async () => {
    const peer = await fakePeer(200, JSON.stringify({ nodeId: "evil", gpus: 64, slots: 4, slotBytes: 1024 }));
    const seen: [string, string, string | null][] = [];
    const refusing = signer((rs, body, given) => {
      seen.push([rs, new TextDecoder().decode(body), given]);
      return false;
    });
    await expect(peerInfo(refusing, peer.url, "m", "ab", 1000)).rejects.toThrow(
      `${peer.url}/v1/peer/info?checkpoint=m&fingerprint=ab answered without the cluster secret's signature (no ckptd daemon of this cluster)`,
    );
    expect(seen).toEqual([["", JSON.stringify({ nodeId: "evil", gpus: 64, slots: 4, slotBytes: 1024 }), null]]);
  });
});

describe("peerInfo", () => {
  it("asks the peer, signed, for what it holds of the checkpoint", async () => {
    const info = { nodeId: "b", gpus: 2, slots: 4, slotBytes: 1024, holds: "m@2" };
    const peer = await fakePeer(200, JSON.stringify(info));
    expect(await peerInfo(sign, peer.url, "my model", "ab12", 1000)).toEqual(info);
    const url = `${peer.url}/v1/peer/info?checkpoint=my%20model&fingerprint=ab12`;
    expect(peer.seen).toEqual([expect.objectContaining({ method: "GET", url: url.slice(peer.url.length), body: "" })]);
    // Asked of whoever answers: the peer's node id is what it tells.
    expect(peer.seen[0]?.headers["x-test-signature"]).toBe(`GET ${url} for *`);
    expect(peer.seen[0]?.headers["content-type"]).toBeUndefined();
  });

  it.each([
    {
      name: "the peer's error message",
      status: 401,
      body: JSON.stringify({ error: { code: "unauthorized", message: "the signature does not match" } }),
      message: "did not answer: the signature does not match",
    },
    {
      name: "the status when the answer names no error",
      status: 503,
      body: "{}",
      message: "did not answer: status 503",
    },
    {
      name: "the start of an answer that is not JSON",
      status: 502,
      body: `<html>${"x".repeat(400)}`,
      message: `did not answer: <html>${"x".repeat(294)}`,
    },
  ])("fails naming the peer and $name", async ({ status, body, message }) => {
    const peer = await fakePeer(status, body);
    await expect(peerInfo(sign, peer.url, "m", "ab", 1000)).rejects.toThrow(new Error(`peer ${peer.url} ${message}`));
  });

  it("gives up on a peer that does not answer within the time limit", async () => {
    const peer = await fakePeer(200);
    const started = performance.now();
    const err = await within(
      3000,
      peerInfo(sign, peer.url, "m", "ab", 200).catch((e: Error) => e),
    );
    expect(performance.now() - started).toBeGreaterThanOrEqual(190);
    expect(String(err)).toMatch(new RegExp(`^Error: peer ${peer.url} did not answer: .*(timeout|aborted)`, "i"));
  });
});

describe("peerRun", () => {
  it("sends the plan as signed JSON and takes a 200 as success", async () => {
    const peer = await fakePeer(200, JSON.stringify({ id: "u-3@node-a", state: "succeeded" }));
    signed.length = 0;
    expect(await peerRun(sign, peer.url, "node-b", plan)).toEqual({ ok: true });
    const seen = peer.seen[0] as Seen;
    expect([seen.method, seen.url, seen.headers["content-type"]]).toEqual([
      "POST",
      "/v1/peer/updates",
      "application/json",
    ]);
    expect(JSON.parse(seen.body)).toEqual(plan);
    // Signed as the very bytes that were sent.
    expect(signed).toEqual([{ method: "POST", url: `${peer.url}/v1/peer/updates`, to: "node-b", body: seen.body }]);
    expect(seen.headers["x-test-signature"]).toBe(`POST ${peer.url}/v1/peer/updates for node-b`);
  });

  it("waits for the peer's end however long it takes", async () => {
    const peer = await fakePeer(200);
    const pending = peerRun(sign, peer.url, "node-b", plan);
    const settled = await Promise.race([
      pending.then(() => "settled"),
      new Promise((r) => setTimeout(r, 300, "waiting")),
    ]);
    expect(settled).toBe("waiting");
    for (const s of servers) s.closeAllConnections();
    expect((await pending).ok).toBe(false);
  });

  it.each([
    {
      name: "the message and the code of its record's error",
      status: 502,
      body: JSON.stringify({
        error: {
          code: "receiver_failed",
          message: "receiver r failed",
          details: { error: { code: "receiver_failed" } },
        },
      }),
      want: { ok: false, message: "receiver r failed", code: "receiver_failed" },
    },
    {
      name: "its message when it has no record",
      status: 409,
      body: JSON.stringify({ error: { code: "update_running", message: "update u-9 of other@1 is running" } }),
      want: { ok: false, message: "update u-9 of other@1 is running", code: undefined },
    },
    {
      name: "its message when its details hold no record",
      status: 400,
      body: JSON.stringify({ error: { code: "invalid_body", message: "bad plan", details: { issues: [] } } }),
      want: { ok: false, message: "bad plan", code: undefined },
    },
    {
      name: "the status of an empty error",
      status: 500,
      body: "{}",
      want: { ok: false, message: "status 500", code: undefined },
    },
    {
      name: "the start of an answer that is not JSON",
      status: 500,
      body: "y".repeat(500),
      want: { ok: false, message: "y".repeat(300), code: undefined },
    },
  ])("reports a failure with $name", async ({ status, body, want }) => {
    const peer = await fakePeer(status, body);
    expect(await peerRun(sign, peer.url, "node-b", plan)).toEqual(want);
  });

  it("reports a peer that cannot be reached, without throwing", async () => {
    const peer = await fakePeer(200, "{}");
    const url = peer.url;
    for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
    const result = await peerRun(sign, url, "node-b", plan);
    // The cause says why (a bare "fetch failed" names nothing).
    expect(result).toEqual({ ok: false, message: expect.stringMatching(/^fetch failed: .*ECONNREFUSED/) });
  });
});

describe("peerAbort", () => {
  it("posts the reason, signed, for the update named in the path", async () => {
    const peer = await fakePeer(200, JSON.stringify({ aborted: true }));
    signed.length = 0;
    await peerAbort(sign, peer.url, "node-b", "u-1@node a", "receiver r failed", 1000);
    const seen = peer.seen[0] as Seen;
    expect([seen.method, seen.url, seen.headers["content-type"]]).toEqual([
      "POST",
      "/v1/peer/updates/u-1%40node%20a/abort",
      "application/json",
    ]);
    expect(JSON.parse(seen.body)).toEqual({ reason: "receiver r failed" });
    expect(signed).toEqual([{ method: "POST", url: `${peer.url}${seen.url}`, to: "node-b", body: seen.body }]);
  });

  it("is best effort: a peer that is gone or silent does not fail it, and a silent one is given up on", async () => {
    const silent = await fakePeer(200);
    await within(3000, peerAbort(sign, silent.url, "node-b", "u-1", "why", 200));
    await expect(peerAbort(sign, "http://127.0.0.1:1", "node-b", "u-1", "why", 200)).resolves.toBeUndefined();
  });
});
