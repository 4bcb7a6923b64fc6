import { Hono, type MiddlewareHandler } from "hono";
import type { Logger } from "pino";
import { CkptError } from "../../ffi/index.ts";
import { readBody, reply } from "./codec.ts";
import { DaemonError, errorBody, httpStatus } from "./errors.ts";

export type Variables = { body: unknown };

/** What the HTTP layer needs from the daemon. */
export interface AppDeps {
  log: Logger;
  /** The body of GET /v1/status. */
  status(): unknown;
  /** Largest JSON or CBOR body (default 16 MiB). */
  maxBodyBytes?: number;
  /** Authentication (http/auth.ts), run before anything else; the daemon always passes it. */
  auth?: MiddlewareHandler;
}

/** Builds the HTTP API. Routes read the decoded body from c.get("body"). */
export function createApp(deps: AppDeps): Hono<{ Variables: Variables }> {
  const app = new Hono<{ Variables: Variables }>();
  if (deps.auth) app.use("*", deps.auth);

  // Bodies are decoded once, before routing, so every route gets the same 400 for bad input.
  // Raw bytes (application/octet-stream) are left for the route to stream.
  app.use("*", async (c, next) => {
    const raw = c.req.header("content-type")?.startsWith("application/octet-stream");
    if ((c.req.method === "POST" || c.req.method === "PUT" || c.req.method === "PATCH") && !raw) {
      c.set("body", await readBody(c, deps.maxBodyBytes));
    }
    await next();
  });

  app.get("/v1/healthz", (c) => reply(c, { ok: true }));
  app.get("/v1/status", (c) => reply(c, deps.status()));

  app.notFound((c) => {
    const err = new DaemonError("not_found", `no route for ${c.req.method} ${new URL(c.req.url).pathname}`);
    return reply(c, errorBody(err), 404);
  });

  app.onError((err, c) => {
    if (err instanceof DaemonError) return reply(c, errorBody(err), httpStatus(err.code));
    if (err instanceof CkptError) {
      deps.log.error({ err }, "data plane call failed");
      const api = new DaemonError("data_plane", err.message, { status: err.status, detail: err.detail });
      return reply(c, errorBody(api), 500);
    }
    deps.log.error({ err }, "request failed");
    return reply(c, errorBody(new DaemonError("internal", "internal error; see the daemon log")), 500);
  });

  return app;
}
