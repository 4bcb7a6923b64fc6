import { describe, expect, it } from "vitest";
import {
  bodyHashOf,
  checkHeaders,
  checkRecipient,
  checkSignature,
  ReplayGuard,
  type SignedRequest,
  sign,
  signedHeaders,
} from "./signature.ts";

const secret = Buffer.from("a-cluster-secret-of-some-length");
const body = new TextEncoder().encode('{"update":"u-1"}');
const now = 1_800_000_000_000;

function request(over: Partial<SignedRequest> = {}): SignedRequest {
  const h = signedHeaders(secret, "POST", "http://10.0.0.2:8470/v1/peer/updates?x=1", "node-b", body, now);
  return {
    method: "POST",
    target: "/v1/peer/updates?x=1",
    to: h["x-ckptd-to"],
    timestamp: h["x-ckptd-timestamp"],
    signature: h["x-ckptd-signature"],
    bodyHash: h["x-ckptd-body-sha256"],
    ...over,
  };
}

describe("peer request signatures", () => {
  it("accepts the request as signed", () => {
    expect(checkHeaders(request(), now)).toEqual({ ok: true });
    expect(checkSignature(secret, request(), body)).toEqual({ ok: true });
  });

  it.each([
    { name: "another method", req: { method: "PUT" }, bytes: body },
    { name: "another path", req: { target: "/v1/peer/updates/u-1/abort?x=1" }, bytes: body },
    { name: "another query", req: { target: "/v1/peer/updates?x=2" }, bytes: body },
    { name: "another timestamp", req: { timestamp: String(now + 1) }, bytes: body },
    { name: "another body hash", req: { bodyHash: "0".repeat(64) }, bytes: body },
  ])("refuses $name", ({ req, bytes }) => {
    expect(checkSignature(secret, request(req), bytes)).toEqual({
      ok: false,
      message: "the signature does not match (do both daemons have the same cluster secret?)",
    });
  });

  it.each([
    { name: "another body", bytes: new TextEncoder().encode('{"update":"u-2"}') },
    { name: "no body", bytes: new Uint8Array() },
  ])("refuses $name than the one signed, once the headers hold", ({ bytes }) => {
    expect(checkSignature(secret, request())).toEqual({ ok: true });
    expect(checkSignature(secret, request(), bytes)).toEqual({
      ok: false,
      message: "the body does not match its signed x-ckptd-body-sha256",
    });
  });

  it("refuses another secret's signature", () => {
    expect(checkSignature(Buffer.from("another-secret-of-some-length"), request(), body).ok).toBe(false);
  });

  it("signs the method in capitals and the body's hash, so either side may spell them", () => {
    const hash = bodyHashOf(body);
    expect(sign(secret, "post", "/a", "n", "1", hash)).toBe(sign(secret, "POST", "/a", "n", "1", hash));
  });

  it.each([
    { name: "no signature", req: { signature: undefined }, message: /must be signed with the cluster secret/ },
    { name: "no timestamp", req: { timestamp: undefined }, message: /must be signed with the cluster secret/ },
    { name: "a timestamp that is no number", req: { timestamp: "1e12" }, message: /milliseconds since 1970/ },
    { name: "a short signature", req: { signature: "abcd" }, message: /64 hex digits/ },
    {
      name: "a timestamp 45 s old",
      req: { timestamp: String(now - 45_000) },
      message: "the request's timestamp is 45.0 s behind this daemon's clock, beyond the bound of 30 s",
    },
    {
      name: "a timestamp 31 s ahead",
      req: { timestamp: String(now + 31_000) },
      message: "the request's timestamp is 31.0 s ahead of this daemon's clock, beyond the bound of 30 s",
    },
  ])("refuses $name before reading the body", ({ req, message }) => {
    const got = checkHeaders(request(req), now);
    expect(got.ok).toBe(false);
    expect((got as { message: string }).message).toMatch(message);
  });

  it("accepts a skew up to the bound", () => {
    expect(checkHeaders(request({ timestamp: String(now - 30_000) }), now).ok).toBe(true);
    expect(checkHeaders(request({ timestamp: String(now + 30_000) }), now).ok).toBe(true);
  });

  it("accepts each signature once within the window, and forgets it after", () => {
    const guard = new ReplayGuard(30_000);
    expect(guard.accept("a", now)).toBe(true);
    expect(guard.accept("a", now + 1)).toBe(false);
    expect(guard.accept("b", now + 1)).toBe(true);
    expect(guard.accept("a", now + 59_000)).toBe(false);
    expect(guard.accept("a", now + 60_001)).toBe(true);
  });
});

describe("peer request signatures, details", () => {
  it("signs the path and query as sent, the time rounded to a millisecond, and an empty body by default", () => {
    const h = signedHeaders(secret, "GET", "http://h:1/v1/peer/info?a=1&b=%20#frag", "*", undefined, 1000.6);
    expect(h).toEqual({
      "x-ckptd-to": "*",
      "x-ckptd-timestamp": "1001",
      "x-ckptd-body-sha256": bodyHashOf(new Uint8Array()),
      "x-ckptd-signature": sign(secret, "GET", "/v1/peer/info?a=1&b=%20", "*", "1001", bodyHashOf(new Uint8Array())),
    });
    expect(h["x-ckptd-body-sha256"]).toBe("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  });

  it("stamps the current time when given none", () => {
    const before = Date.now();
    const stamp = Number(signedHeaders(secret, "GET", "http://h:1/v1/peer/info", "*")["x-ckptd-timestamp"]);
    expect(stamp).toBeGreaterThanOrEqual(before);
    expect(stamp).toBeLessThanOrEqual(Date.now());
  });

  it("signs each part apart: moving a line break between them changes the signature", () => {
    const hash = bodyHashOf(body);
    expect(sign(secret, "POST", "/a", "n", "12", hash)).not.toBe(sign(secret, "POST", "/a", "n1", "2", hash));
    expect(sign(secret, "POST", "/a", "n", "1", hash)).not.toBe(sign(secret, "POST", "/a\nn", "", "1", hash));
    expect(sign(secret, "POST", "/a", "n", "1", hash)).toMatch(/^[0-9a-f]{64}$/);
  });

  it.each([
    {
      name: "no body hash",
      req: { bodyHash: undefined },
      message: "x-ckptd-body-sha256 must be the body's SHA-256 in 64 hex digits",
    },
    {
      name: "a body hash in capitals",
      req: { bodyHash: "A".repeat(64) },
      message: "x-ckptd-body-sha256 must be the body's SHA-256 in 64 hex digits",
    },
    {
      name: "a signature in capitals",
      req: { signature: "A".repeat(64) },
      message: "x-ckptd-signature must be 64 hex digits",
    },
    {
      name: "a signature with more",
      req: { signature: `${"a".repeat(64)}0` },
      message: "x-ckptd-signature must be 64 hex digits",
    },
    {
      name: "a timestamp of 17 digits",
      req: { timestamp: "1".repeat(17) },
      message: "x-ckptd-timestamp must be milliseconds since 1970",
    },
    {
      name: "a negative timestamp",
      req: { timestamp: "-1" },
      message: "x-ckptd-timestamp must be milliseconds since 1970",
    },
    {
      name: "an empty timestamp",
      req: { timestamp: "" },
      message: "x-ckptd-timestamp must be milliseconds since 1970",
    },
    {
      name: "no headers at all",
      req: { timestamp: undefined, signature: undefined },
      message: "peer API requests must be signed with the cluster secret (x-ckptd-timestamp and x-ckptd-signature)",
    },
  ])("refuses $name with the exact message", ({ req, message }) => {
    expect(checkHeaders(request(req), now)).toEqual({ ok: false, message });
  });

  it("bounds the skew by the window it is given", () => {
    expect(checkHeaders(request({ timestamp: String(now - 1500) }), now, 1000)).toEqual({
      ok: false,
      message:
        "the request's timestamp is 1.5 s behind this daemon's clock, beyond the bound of 1 s (check the hosts' clocks)",
    });
    expect(checkHeaders(request({ timestamp: String(now - 1000) }), now, 1000)).toEqual({ ok: true });
  });

  it("refuses a signature of another length without throwing", () => {
    for (const signature of ["ab", "", undefined]) {
      expect(checkSignature(secret, request({ signature }), body).ok).toBe(false);
    }
  });

  it("remembers signatures for two windows by default, forgetting only the older ones", () => {
    const guard = new ReplayGuard();
    expect(guard.accept("a", 0)).toBe(true);
    expect(guard.accept("b", 50_000)).toBe(true);
    expect(guard.accept("a", 60_000)).toBe(false);
    expect(guard.accept("c", 60_001)).toBe(true); // forgets a, keeps b
    expect(guard.accept("b", 60_001)).toBe(false);
    expect(guard.accept("a", 60_001)).toBe(true);
  });
});

describe("the recipient of a peer request", () => {
  it("is bound by the signature: a request for one daemon is refused by another, even validly signed", () => {
    expect(checkSignature(secret, request(), body).ok).toBe(true);
    expect(checkRecipient(request(), "node-b")).toEqual({ ok: true });
    expect(checkRecipient(request(), "node-c")).toEqual({
      ok: false,
      message: "the request was signed for node node-b, not for this daemon (node-c)",
    });
    // Naming another recipient breaks the signature.
    expect(checkSignature(secret, request({ to: "node-c" }), body).ok).toBe(false);
  });

  it("may be anyone only for GET /v1/peer/info", () => {
    const info = { method: "GET", target: "/v1/peer/info?checkpoint=m", to: "*" };
    expect(checkRecipient(request(info), "node-c")).toEqual({ ok: true });
    expect(checkRecipient(request({ to: "*" }), "node-c").ok).toBe(false); // POST /v1/peer/updates
    expect(checkRecipient(request({ ...info, method: "POST" }), "node-c").ok).toBe(false);
    expect(checkRecipient(request({ ...info, target: "/v1/peer/info/x" }), "node-c").ok).toBe(false);
  });

  it("must be named", () => {
    for (const to of [undefined, "", "a b", "x".repeat(201)]) {
      expect(checkHeaders(request({ to }), now)).toEqual({
        ok: false,
        message: "x-ckptd-to must name the node the request is for",
      });
    }
  });
});
