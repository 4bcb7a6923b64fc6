/**
 * Authentication of every request, before its body is decoded or a route runs: tokens with
 * roles for user routes, the cluster secret's signature for the peer API, nothing for
 * GET /v1/healthz. Failures are 401 / 403 in the one error shape, naming no credential.
 */
import type { MiddlewareHandler } from "hono";
import type { Credentials } from "../auth/credentials.ts";
import {
  ANSWER_HEADER,
  answerSignature,
  BODY_HASH_HEADER,
  checkBody,
  checkHeaders,
  checkRecipient,
  checkSignature,
  ReplayGuard,
  SIGNATURE_HEADER,
  TIMESTAMP_HEADER,
  TO_HEADER,
  type Verdict,
} from "../auth/signature.ts";
import { decideAccess, routeKind } from "../auth/tokens.ts";
import { DaemonError } from "../errors.ts";
import { MAX_BODY_BYTES, readLimited } from "./codec.ts";

export interface AuthOptions {
  /** The credentials now (they change on SIGHUP). */
  credentials(): Credentials;
  /** This daemon's node id: peer requests must be signed for it. */
  nodeId: string;
  /** Milliseconds since 1970; a test's clock. */
  now?: () => number;
  windowMs?: number;
  /** Largest body a peer request may have (maxBodyBytes). */
  maxBodyBytes?: number;
}

/** The middleware; app.ts runs it before anything else. */
export function auth(opts: AuthOptions): MiddlewareHandler {
  const now = opts.now ?? Date.now;
  const replays = new ReplayGuard(opts.windowMs);
  return async (c, next) => {
    const kind = routeKind(c.req.method, c.req.path);
    if (kind === "open") return next();
    const { tokens, secret } = opts.credentials();
    if (kind === "user") {
      const access = decideAccess(c.req.method, c.req.path, c.req.header("authorization"), tokens);
      if (!access.ok) {
        if (access.code === "forbidden") throw new DaemonError("forbidden", access.message);
        c.header("www-authenticate", 'Bearer realm="ckptd"');
        throw new DaemonError("unauthorized", access.message);
      }
      return next();
    }
    const url = new URL(c.req.url);
    const req = {
      method: c.req.method,
      target: url.pathname + url.search,
      to: c.req.header(TO_HEADER),
      timestamp: c.req.header(TIMESTAMP_HEADER),
      signature: c.req.header(SIGNATURE_HEADER),
      bodyHash: c.req.header(BODY_HASH_HEADER),
    };
    const at = now();
    let verdict: Verdict = checkHeaders(req, at, opts.windowMs);
    // Nothing of the body is read before the signature over its hash holds.
    if (verdict.ok) verdict = checkSignature(secret, req);
    if (verdict.ok) verdict = checkRecipient(req, opts.nodeId);
    if (verdict.ok) {
      const body = await readLimited(c, opts.maxBodyBytes ?? MAX_BODY_BYTES);
      verdict = checkBody(req, body);
      // The body decoder in app.ts reads the request again: it gets the bytes just verified.
      if (c.req.method !== "GET" && c.req.method !== "HEAD") {
        c.req.raw = new Request(c.req.raw.url, {
          method: c.req.method,
          headers: c.req.raw.headers,
          body: body as Uint8Array<ArrayBuffer>,
        });
      }
    }
    if (verdict.ok && !replays.accept(req.signature as string, at)) {
      verdict = { ok: false, message: "this signature was already used (a replayed request)" };
    }
    if (!verdict.ok) throw new DaemonError("unauthorized", verdict.message);
    await next();
    // The answer is signed too, over the request's signature and its own bytes.
    const bytes = new Uint8Array(await c.res.clone().arrayBuffer());
    const signed = new Response(bytes, c.res);
    signed.headers.set(ANSWER_HEADER, answerSignature(secret, req.signature as string, bytes));
    c.res = signed;
  };
}
