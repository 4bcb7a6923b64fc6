import { decode, encode } from "cbor-x";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { signedHeaders } from "../auth/signature.ts";
import { parseTokens } from "../auth/tokens.ts";
import { createApp } from "./app.ts";
import { auth } from "./auth.ts";
import { reply } from "./codec.ts";

const ADMIN = "admin-token-0123456789";
const READ = "read-token-0123456789ab";
const secret = Buffer.from("the-cluster-secret-0123456789");
const credentials = { tokens: parseTokens(`admin:${ADMIN}\nread:${READ}\n`, "tokens"), secret };

/** An app with the middleware, a fixed clock, and routes that record what reached them. */
function appWith() {
  let clock = 1_800_000_000_000;
  const reached: { path: string; body: unknown }[] = [];
  const app = createApp({
    log: pino({ level: "silent" }),
    status: () => ({ ok: 1 }),
    auth: auth({ credentials: () => credentials, nodeId: "self", now: () => clock }),
  });
  app.post("/v1/checkpoints", (c) => reply(c, { posted: c.get("body") }, 201));
  app.delete("/v1/checkpoints/:name", (c) => reply(c, { deleted: c.req.param("name") }));
  app.get("/v1/peer/info", (c) => {
    reached.push({ path: c.req.url, body: undefined });
    return reply(c, { nodeId: "n" });
  });
  app.post("/v1/peer/updates", (c) => {
    reached.push({ path: c.req.path, body: c.get("body") });
    return reply(c, { accepted: c.get("body") });
  });
  const tick = (ms: number) => {
    clock += ms;
  };
  return { app, reached, now: () => clock, tick };
}

async function errorOf(res: Response) {
  return ((await res.json()) as { error: { code: string; message: string } }).error;
}

const bearer = (t: string) => ({ authorization: `Bearer ${t}` });

describe("tokens on the API", () => {
  const { app } = appWith();

  it("leaves GET /v1/healthz open", async () => {
    expect((await app.request("/v1/healthz")).status).toBe(200);
  });

  it.each([
    { name: "no token", headers: {} as Record<string, string>, message: /needs an Authorization: Bearer <token>/ },
    { name: "a wrong token", headers: bearer("wrong-token-0123456789"), message: /the token is not valid/ },
    { name: "another scheme", headers: { authorization: `Basic ${ADMIN}` }, message: /must be "Bearer <token>"/ },
  ])("answers 401 with $name, in the error shape", async ({ headers, message }) => {
    for (const path of ["/v1/status", "/v1/nope", "/metrics"]) {
      const res = await app.request(path, { headers });
      expect(res.status).toBe(401);
      expect(res.headers.get("www-authenticate")).toBe('Bearer realm="ckptd"');
      const body = (await res.json()) as { error: { code: string; message: string } };
      expect(Object.keys(body)).toEqual(["error"]);
      expect(body.error.code).toBe("unauthorized");
      expect(body.error.message).toMatch(message);
      expect(JSON.stringify(body)).not.toContain(ADMIN);
    }
  });

  it("answers 401 before decoding a body: a bad body without a token is no 400", async () => {
    const res = await app.request("/v1/checkpoints", {
      method: "POST",
      body: "{",
      headers: { "content-type": "application/json" },
    });
    expect(res.status).toBe(401);
  });

  it("lets a read token GET, and refuses it POST and DELETE with 403", async () => {
    expect(await (await app.request("/v1/status", { headers: bearer(READ) })).json()).toEqual({ ok: 1 });
    const post = await app.request("/v1/checkpoints", {
      method: "POST",
      headers: { ...bearer(READ), "content-type": "application/json" },
      body: "{}",
    });
    expect(post.status).toBe(403);
    expect(await errorOf(post)).toEqual({
      code: "forbidden",
      message: "POST /v1/checkpoints needs an admin token; this one may only read",
    });
    const del = await app.request("/v1/checkpoints/m", { method: "DELETE", headers: bearer(READ) });
    expect(del.status).toBe(403);
    expect((await errorOf(del)).code).toBe("forbidden");
  });

  it("lets an admin token do everything", async () => {
    const post = await app.request("/v1/checkpoints", {
      method: "POST",
      headers: { ...bearer(ADMIN), "content-type": "application/json" },
      body: '{"name":"m"}',
    });
    expect(post.status).toBe(201);
    expect(await post.json()).toEqual({ posted: { name: "m" } });
    expect((await app.request("/v1/checkpoints/m", { method: "DELETE", headers: bearer(ADMIN) })).status).toBe(200);
  });
});

describe("signatures on the peer API", () => {
  const plan = { update: "u-1", buckets: [1, 2, 3] };

  function signedPost(
    now: number,
    body: Uint8Array,
    type = "application/json",
    path = "/v1/peer/updates",
    to = "self",
  ) {
    return {
      method: "POST",
      headers: { ...signedHeaders(secret, "POST", `http://x${path}`, to, body, now), "content-type": type },
      body: body as Uint8Array<ArrayBuffer>,
    };
  }

  it("passes a signed request, its JSON body decoded from the bytes signed", async () => {
    const { app, reached, now } = appWith();
    const res = await app.request(
      "/v1/peer/updates",
      signedPost(now(), new TextEncoder().encode(JSON.stringify(plan))),
    );
    expect(res.status).toBe(200);
    expect(reached).toEqual([{ path: "/v1/peer/updates", body: plan }]);
  });

  it("refuses a bad signature before reading a byte of the body", async () => {
    const { app, reached, now } = appWith();
    let pulled = 0;
    const endless = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        controller.enqueue(new Uint8Array(1 << 16));
      },
    });
    const headers = {
      ...signedHeaders(
        Buffer.from("not-the-cluster-secret-at-all"),
        "POST",
        "http://x/v1/peer/updates",
        "self",
        new Uint8Array(),
        now(),
      ),
      "content-type": "application/json",
    };
    const res = await app.request("/v1/peer/updates", {
      method: "POST",
      headers,
      body: endless,
      duplex: "half",
    } as RequestInit);
    expect(res.status).toBe(401);
    expect(reached).toEqual([]);
    expect(pulled).toBeLessThanOrEqual(1); // at most what a stream buffers at its start
  });

  it("passes a signed CBOR body", async () => {
    const { app, reached, now } = appWith();
    const bytes = new Uint8Array(encode(plan));
    const res = await app.request("/v1/peer/updates", {
      ...signedPost(now(), bytes, "application/cbor"),
      headers: { ...signedPost(now(), bytes, "application/cbor").headers, accept: "application/cbor" },
    });
    expect(res.status).toBe(200);
    expect(decode(new Uint8Array(await res.arrayBuffer()))).toEqual({ accepted: plan });
    expect(reached).toHaveLength(1);
  });

  it("passes a signed GET with its query", async () => {
    const { app, reached, now } = appWith();
    const url = "http://x/v1/peer/info?checkpoint=m&fingerprint=ab";
    const res = await app.request(url, { headers: signedHeaders(secret, "GET", url, "*", undefined, now()) });
    expect(res.status).toBe(200);
    expect(reached).toHaveLength(1);
  });

  it.each([
    { name: "unsigned, with an admin token", make: () => ({ headers: bearer(ADMIN) }), message: /must be signed/ },
    {
      name: "signed with another secret",
      make: (now: number) => ({
        headers: signedHeaders(
          Buffer.from("another-secret-0123456789"),
          "GET",
          "http://x/v1/peer/info?a=1",
          "self",
          undefined,
          now,
        ),
      }),
      message: /the signature does not match/,
    },
    {
      name: "signed for another query",
      make: (now: number) => ({
        headers: signedHeaders(secret, "GET", "http://x/v1/peer/info?a=2", "self", undefined, now),
      }),
      message: /the signature does not match/,
    },
    {
      name: "signed 31 s ago",
      make: (now: number) => ({
        headers: signedHeaders(secret, "GET", "http://x/v1/peer/info?a=1", "self", undefined, now - 31_000),
      }),
      message:
        "the request's timestamp is 31.0 s behind this daemon's clock, beyond the bound of 30 s (check the hosts' clocks)",
    },
  ])("answers 401 to a request $name, and nothing runs", async ({ make, message }) => {
    const { app, reached, now } = appWith();
    const res = await app.request("/v1/peer/info?a=1", make(now()));
    expect(res.status).toBe(401);
    const error = await errorOf(res);
    expect(error.code).toBe("unauthorized");
    expect(error.message).toMatch(message);
    expect(error.message).not.toContain(secret.toString());
    expect(reached).toEqual([]);
  });

  it("refuses a signed request sent again, within the window", async () => {
    const { app, reached, now, tick } = appWith();
    const signed = signedPost(now(), new TextEncoder().encode(JSON.stringify(plan)));
    expect((await app.request("/v1/peer/updates", signed)).status).toBe(200);
    tick(5_000);
    const again = await app.request("/v1/peer/updates", signed);
    expect(again.status).toBe(401);
    expect((await errorOf(again)).message).toBe("this signature was already used (a replayed request)");
    expect(reached).toHaveLength(1);
  });

  it("refuses a request signed for another daemon of the cluster (one sent there, replayed here)", async () => {
    const { app, reached, now } = appWith();
    const body = new TextEncoder().encode(JSON.stringify(plan));
    const res = await app.request(
      "/v1/peer/updates",
      signedPost(now(), body, "application/json", "/v1/peer/updates", "other"),
    );
    expect(res.status).toBe(401);
    expect((await errorOf(res)).message).toBe("the request was signed for node other, not for this daemon (self)");
    const anyone = await app.request(
      "/v1/peer/updates",
      signedPost(now(), body, "application/json", "/v1/peer/updates", "*"),
    );
    expect(anyone.status).toBe(401);
    expect(reached).toEqual([]);
  });

  it("refuses a body other than the one signed", async () => {
    const { app, reached, now } = appWith();
    const signed = signedPost(now(), new TextEncoder().encode(JSON.stringify(plan)));
    const res = await app.request("/v1/peer/updates", { ...signed, body: JSON.stringify({ ...plan, update: "u-2" }) });
    expect(res.status).toBe(401);
    expect(reached).toEqual([]);
  });

  it("answers 401, not 400, to a malformed body that is not signed", async () => {
    const { app } = appWith();
    const res = await app.request("/v1/peer/updates", {
      method: "POST",
      body: "{",
      headers: { "content-type": "application/json" },
    });
    expect(res.status).toBe(401);
  });

  it("guards the peer API also under a percent-encoded path", async () => {
    const { app, reached } = appWith();
    const res = await app.request("/v1/%70eer/info", { headers: bearer(ADMIN) });
    expect(res.status).toBe(401);
    expect(reached).toEqual([]);
  });
});
