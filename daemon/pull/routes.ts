/** POST /v1/peer/pull (signed): the manifest of a version this daemon can serve to a puller. */
import type { Hono } from "hono";
import * as v from "valibot";
import type { Registry } from "../checkpoints/registry.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import { fingerprint } from "../update/fingerprint.ts";
import type { PullSource } from "./serve.ts";

const AskBody = v.object({
  name: v.pipe(v.string(), v.maxLength(200)),
  /** Absent: the newest ready version of the name. */
  fingerprint: v.optional(v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/))),
});

export function pullRoutes(app: Hono<{ Variables: { body: unknown } }>, source: PullSource, registry: Registry) {
  app.post("/v1/peer/pull", async (c) => {
    const ask = parseBody(AskBody, c.get("body"));
    const fp = ask.fingerprint ?? fingerprint(registry.get(ask.name));
    return reply(c, await source.manifest(ask.name, fp));
  });
}
