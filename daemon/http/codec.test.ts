import pino from "pino";
import { describe, expect, it } from "vitest";
import { createApp } from "./app.ts";
import { wantsCbor } from "./codec.ts";

describe("choosing CBOR or JSON from Accept", () => {
  it.each([
    [undefined, false],
    ["", false],
    ["application/cbor", true],
    ["application/json", false],
    ["application/json, application/cbor", false],
    ["application/cbor, application/json", true],
    ["application/cbor;q=0.5, application/json", false],
    ["application/json;q=0.5, application/cbor", true],
    ["application/json; q=0.9, application/cbor; q=0.8", false],
    ["application/cbor;q=0", false],
    ["application/cbor, */*", true],
    ["*/*, application/cbor", false],
    ["*/*;q=0.1, application/cbor", true],
    ["text/html, application/cbor;q=0.9", true],
    ["APPLICATION/CBOR", true],
  ])("Accept %j: CBOR %s", (accept, cbor) => {
    expect(wantsCbor(accept)).toBe(cbor);
  });
});

describe("the body limit (maxBodyBytes)", () => {
  const app = createApp({ log: pino({ level: "silent" }), status: () => ({}), maxBodyBytes: 1024 });
  const json = (n: number) => JSON.stringify({ pad: "x".repeat(n - 10) }); // n bytes
  const post = (body: BodyInit, headers: Record<string, string> = {}) =>
    app.request("/v1/nowhere", {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body,
      duplex: "half",
    } as RequestInit);

  it("takes a body of exactly the limit", async () => {
    expect(json(1024)).toHaveLength(1024);
    const res = await post(json(1024));
    expect(res.status).toBe(404); // decoded, then routed: no route here
  });

  it("answers a declared Content-Length beyond it with a 413 naming the limit", async () => {
    const res = await post(json(1025), { "content-length": "1025" });
    expect(res.status).toBe(413);
    expect(await res.json()).toEqual({
      error: {
        code: "body_too_large",
        message: "request body of 1025 bytes exceeds the limit of 1024 bytes (maxBodyBytes)",
        details: { maxBodyBytes: 1024 },
      },
    });
  });

  it("stops reading a chunked body at the first chunk past the limit", async () => {
    let pulled = 0;
    const chunk = 64 << 10;
    const large = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        if (pulled > 1024)
          controller.close(); // 64 MiB in all
        else controller.enqueue(new Uint8Array(chunk).fill(0x20));
      },
    });
    const res = await post(large);
    expect(res.status).toBe(413);
    expect(((await res.json()) as { error: { message: string } }).error.message).toBe(
      "request body exceeds the limit of 1024 bytes (maxBodyBytes)",
    );
    // A few chunks of read-ahead at most, not the whole body.
    expect(pulled).toBeLessThan(8);
  });
});
