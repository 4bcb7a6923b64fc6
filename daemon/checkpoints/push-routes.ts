import type { Hono } from "hono";
import * as v from "valibot";
import { DaemonError } from "../errors.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import { type PushDeps, pushFromDevices } from "./device-push.ts";
import { PushParts } from "./push-parts.ts";
import type { StagingAreas } from "./staging.ts";
import { TensorDecl } from "./upload-routes.ts";

const CreateBody = v.strictObject({
  name: v.string(),
  tensors: v.pipe(v.array(TensorDecl), v.minLength(1, "declare at least one tensor")),
  metadata: v.optional(v.record(v.string(), v.string())),
});

const count = v.pipe(v.number(), v.integer(), v.minValue(0));

const PushBody = v.strictObject({
  name: v.string(),
  metadata: v.optional(v.record(v.string(), v.string())),
  buffers: v.pipe(
    v.array(
      v.strictObject({
        kind: v.picklist(["cuda", "host"]),
        device: v.pipe(v.string(), v.minLength(1)),
        len: v.pipe(count, v.minValue(1)),
        pid: count,
        handle: v.pipe(v.string(), v.base64(), v.maxLength(172)),
      }),
    ),
    v.minLength(1, "give at least one buffer"),
  ),
  tensors: v.pipe(
    v.array(v.strictObject({ ...TensorDecl.entries, buffer: count, offset: count })),
    v.minLength(1, "declare at least one tensor"),
  ),
  /** "name@N": the version is that one with these tensors replaced (device-push.ts). */
  base: v.optional(v.pipe(v.string(), v.minLength(1), v.maxLength(140))),
  /** One rank's part of a sharded push (push-parts.ts). */
  part: v.optional(
    v.strictObject({
      id: v.pipe(v.string(), v.minLength(1), v.maxLength(128)),
      index: count,
      of: v.pipe(count, v.minValue(1), v.maxValue(1024)),
      waitMs: v.optional(v.pipe(count, v.minValue(1), v.maxValue(600_000))),
    }),
  ),
});

/**
 * Trainer pushes without bytes through HTTP: staging areas (GET|POST /v1/staging,
 * POST /v1/staging/{id}/commit, DELETE /v1/staging/{id}) and pushes from GPUs (POST /v1/pushes).
 */
export function pushRoutes(app: Hono<{ Variables: { body: unknown } }>, areas: StagingAreas, deps: PushDeps) {
  const parts = new PushParts(deps);
  app.post("/v1/pushes", async (c) => {
    const { part, ...req } = parseBody(PushBody, c.get("body"));
    if (part && req.base) throw new DaemonError("invalid_request", "a sharded push cannot name a base");
    const version = part ? await parts.push(req, part) : await pushFromDevices([req], deps);
    c.header("location", `/v1/checkpoints/${version.id}`);
    return reply(c, version.summary(), 201);
  });

  app.get("/v1/staging", (c) => reply(c, { areas: areas.list() }));

  app.post("/v1/staging", async (c) => reply(c, await areas.create(parseBody(CreateBody, c.get("body"))), 201));

  app.post("/v1/staging/:id/commit", async (c) => {
    const version = await areas.commit(c.req.param("id"));
    c.header("location", `/v1/checkpoints/${version.id}`);
    return reply(c, version.summary(), 201);
  });

  app.delete("/v1/staging/:id", async (c) => reply(c, { deleted: await areas.delete(c.req.param("id")) }));
}
