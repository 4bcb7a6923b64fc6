/**
 * Signatures of the peer API: an HMAC-SHA256 with the cluster secret over the method, the
 * request target (path and query as sent), the node id of the daemon it is for, a timestamp
 * and the body's SHA-256, which travels in a header too: the server verifies the signature
 * before it reads a byte of the body, then the body against its hash. It accepts a timestamp
 * within a window of its clock, each signature once, and only requests signed for itself (a
 * request to one daemon cannot be replayed to another of the cluster). Only a peer's info may
 * be asked of whoever answers ("*"): that is how a coordinator learns a peer's node id.
 */
import { createHash, createHmac, timingSafeEqual } from "node:crypto";

export const TIMESTAMP_HEADER = "x-ckptd-timestamp";
export const SIGNATURE_HEADER = "x-ckptd-signature";
export const BODY_HASH_HEADER = "x-ckptd-body-sha256";
/** The node id of the daemon the request is for, or "*" (where checkRecipient allows it). */
export const TO_HEADER = "x-ckptd-to";
export const ANY_NODE = "*";

/** The SHA-256 (hex) of a body, as signed. */
export function bodyHashOf(body: Uint8Array): string {
  return createHash("sha256").update(body).digest("hex");
}
/** Bound on the clock skew between hosts, and how long a signature is remembered. */
export const REPLAY_WINDOW_MS = 30_000;

/** The signature (hex) of one request; `target` is the path with its query, as sent; `to` the node it is for. */
export function sign(
  secret: Buffer,
  method: string,
  target: string,
  to: string,
  timestamp: string,
  bodyHash: string,
): string {
  return createHmac("sha256", secret)
    .update(["ckptd-peer-v2", method.toUpperCase(), target, to, timestamp, bodyHash].join("\n"))
    .digest("hex");
}

/** The header that signs a peer's answer (answerSignature). */
export const ANSWER_HEADER = "x-ckptd-answer-signature";

/**
 * The signature (hex) of an answer to the request signed `requestSignature`: whoever answers
 * at a URL must hold the cluster secret for its answer to count (a heartbeat's answer says who
 * answers there), and the answer cannot be one to another request.
 */
export function answerSignature(secret: Buffer, requestSignature: string, body: Uint8Array): string {
  return createHmac("sha256", secret)
    .update(["ckptd-answer-v1", requestSignature, bodyHashOf(body)].join("\n"))
    .digest("hex");
}

/** Whether `given` is the answer signature of `body` to the request signed `requestSignature`. */
export function checkAnswer(secret: Buffer, requestSignature: string, body: Uint8Array, given: string | null): boolean {
  if (!given) return false;
  const expected = Buffer.from(answerSignature(secret, requestSignature, body), "hex");
  const got = Buffer.from(given, "hex");
  return got.length === expected.length && timingSafeEqual(got, expected);
}

/** The headers that sign a request to `url` for the daemon `to` (the target is taken as fetch will send it). */
export function signedHeaders(
  secret: Buffer,
  method: string,
  url: string,
  to: string,
  body: Uint8Array = new Uint8Array(),
  now: number = Date.now(),
): Record<string, string> {
  const u = new URL(url);
  const timestamp = String(Math.round(now));
  const bodyHash = bodyHashOf(body);
  return {
    [TO_HEADER]: to,
    [TIMESTAMP_HEADER]: timestamp,
    [BODY_HASH_HEADER]: bodyHash,
    [SIGNATURE_HEADER]: sign(secret, method, u.pathname + u.search, to, timestamp, bodyHash),
  };
}

export interface SignedRequest {
  method: string;
  target: string;
  to: string | undefined;
  timestamp: string | undefined;
  signature: string | undefined;
  bodyHash: string | undefined;
}

export type Verdict = { ok: true } | { ok: false; message: string };

/** Checks what needs no body: both headers present and well-formed, the timestamp in the window. */
export function checkHeaders(req: SignedRequest, now: number, windowMs = REPLAY_WINDOW_MS): Verdict {
  if (req.timestamp === undefined || req.signature === undefined) {
    return {
      ok: false,
      message: `peer API requests must be signed with the cluster secret (${TIMESTAMP_HEADER} and ${SIGNATURE_HEADER})`,
    };
  }
  if (!/^\d{1,16}$/.test(req.timestamp))
    return { ok: false, message: `${TIMESTAMP_HEADER} must be milliseconds since 1970` };
  if (!/^[0-9a-f]{64}$/.test(req.signature)) return { ok: false, message: `${SIGNATURE_HEADER} must be 64 hex digits` };
  if (!/^[0-9a-f]{64}$/.test(req.bodyHash ?? ""))
    return { ok: false, message: `${BODY_HASH_HEADER} must be the body's SHA-256 in 64 hex digits` };
  if (req.to === undefined || !/^[\w.:@*-]{1,200}$/.test(req.to))
    return { ok: false, message: `${TO_HEADER} must name the node the request is for` };
  const skew = now - Number(req.timestamp);
  if (Math.abs(skew) > windowMs) {
    return {
      ok: false,
      message:
        `the request's timestamp is ${(Math.abs(skew) / 1000).toFixed(1)} s ${skew > 0 ? "behind" : "ahead of"} ` +
        `this daemon's clock, beyond the bound of ${windowMs / 1000} s (check the hosts' clocks)`,
    };
  }
  return { ok: true };
}

/** Whether the signature is the secret's for this request and body (constant-time compare). */
/** Checks the signature over the headers (no body needed), then, when given, the body against its signed hash. */
export function checkSignature(secret: Buffer, req: SignedRequest, body?: Uint8Array): Verdict {
  const expected = Buffer.from(
    sign(secret, req.method, req.target, req.to ?? "", req.timestamp ?? "", req.bodyHash ?? ""),
    "hex",
  );
  const given = Buffer.from(req.signature ?? "", "hex");
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
    return { ok: false, message: "the signature does not match (do both daemons have the same cluster secret?)" };
  }
  return body === undefined ? { ok: true } : checkBody(req, body);
}

/**
 * Requests that may be signed for any daemon: those a daemon sends to a URL before it knows who
 * answers there (asking for its GPUs; a heartbeat to a seed, a DNS address, a URL given to POST
 * /v1/peers). Replayed elsewhere, they only tell the truth about their sender.
 */
const ANYONE = new Set(["GET /v1/peer/info", "POST /v1/peer/heartbeat"]);

/** The request was signed for this daemon (`self`), or for any, where that is allowed. */
export function checkRecipient(req: SignedRequest, self: string): Verdict {
  if (req.to === self) return { ok: true };
  if (req.to === ANY_NODE && ANYONE.has(`${req.method} ${req.target.split("?")[0]}`)) return { ok: true };
  return { ok: false, message: `the request was signed for node ${req.to}, not for this daemon (${self})` };
}

/** The body is the one signed: its SHA-256 is the signed hash. */
export function checkBody(req: SignedRequest, body: Uint8Array): Verdict {
  if (bodyHashOf(body) === req.bodyHash) return { ok: true };
  return { ok: false, message: `the body does not match its signed ${BODY_HASH_HEADER}` };
}

/** Remembers the signatures accepted within the window, to refuse a request replayed. */
export class ReplayGuard {
  private readonly seen = new Map<string, number>();

  constructor(private readonly windowMs = REPLAY_WINDOW_MS) {}

  /** Records a signature; false if it was already used within the window. */
  accept(signature: string, now: number): boolean {
    for (const [s, at] of this.seen) {
      if (now - at <= 2 * this.windowMs) break;
      this.seen.delete(s);
    }
    if (this.seen.has(signature)) return false;
    this.seen.set(signature, now);
    return true;
  }
}
