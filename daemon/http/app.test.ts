import { decode, encode } from "cbor-x";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { createApp } from "./app.ts";

const app = createApp({ log: pino({ level: "silent" }), status: () => ({ nodeId: "n1", gpus: [] }) });

async function errorOf(res: Response): Promise<{ code: string; message: string }> {
  const body = (await res.json()) as { error: { code: string; message: string } };
  expect(Object.keys(body)).toEqual(["error"]);
  return body.error;
}

describe("HTTP API", () => {
  it("answers healthz and status in JSON by default", async () => {
    const res = await app.request("/v1/healthz");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/application\/json/);
    expect(await res.json()).toEqual({ ok: true });
    expect(await (await app.request("/v1/status")).json()).toEqual({ nodeId: "n1", gpus: [] });
  });

  it("answers in CBOR when the client accepts it", async () => {
    const res = await app.request("/v1/status", { headers: { accept: "application/cbor" } });
    expect(res.headers.get("content-type")).toBe("application/cbor");
    expect(decode(new Uint8Array(await res.arrayBuffer()))).toEqual({ nodeId: "n1", gpus: [] });
  });

  it("gives unknown routes a 404 in the error shape", async () => {
    const res = await app.request("/v1/nope");
    expect(res.status).toBe(404);
    expect(await errorOf(res)).toEqual({ code: "not_found", message: "no route for GET /v1/nope" });
  });

  it.each([
    { name: "truncated JSON", type: "application/json", body: '{"name": ', message: /malformed JSON body/ },
    {
      name: "JSON that is not UTF-8",
      type: "application/json",
      body: new Uint8Array([0xff, 0xfe]),
      message: /malformed JSON/,
    },
    {
      name: "truncated CBOR",
      type: "application/cbor",
      body: new Uint8Array(encode({ name: "abc" }).subarray(0, 4)),
      message: /malformed CBOR/,
    },
  ])("rejects $name with a 400, never a 500", async ({ type, body, message }) => {
    const res = await app.request("/v1/checkpoints", { method: "POST", headers: { "content-type": type }, body });
    expect(res.status).toBe(400);
    expect((await errorOf(res)).message).toMatch(message);
  });

  it("rejects other media types with a 415", async () => {
    const res = await app.request("/v1/checkpoints", {
      method: "POST",
      headers: { "content-type": "text/xml" },
      body: "<a/>",
    });
    expect(res.status).toBe(415);
    expect((await errorOf(res)).code).toBe("unsupported_media_type");
  });

  it("sends errors in CBOR to CBOR clients", async () => {
    const res = await app.request("/v1/checkpoints", {
      method: "POST",
      headers: { "content-type": "application/cbor", accept: "application/cbor" },
      body: new Uint8Array([0xbf]),
    });
    expect(res.status).toBe(400);
    expect(decode(new Uint8Array(await res.arrayBuffer())).error.code).toBe("malformed_body");
  });

  it("turns unexpected failures into a 500 in the error shape", async () => {
    const failing = createApp({
      log: pino({ level: "silent" }),
      status: () => {
        throw new Error("boom");
      },
    });
    const res = await failing.request("/v1/status");
    expect(res.status).toBe(500);
    expect(await errorOf(res)).toEqual({ code: "internal", message: "internal error; see the daemon log" });
  });
});
