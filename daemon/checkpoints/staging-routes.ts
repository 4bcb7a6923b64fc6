import type { Hono } from "hono";
import * as v from "valibot";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import type { StagingAreas } from "./staging.ts";
import { TensorDecl } from "./upload-routes.ts";

const CreateBody = v.strictObject({
  name: v.string(),
  tensors: v.pipe(v.array(TensorDecl), v.minLength(1, "declare at least one tensor")),
  metadata: v.optional(v.record(v.string(), v.string())),
});

/** GET|POST /v1/staging, POST /v1/staging/{id}/commit, DELETE /v1/staging/{id}. */
export function stagingRoutes(app: Hono<{ Variables: { body: unknown } }>, areas: StagingAreas) {
  app.get("/v1/staging", (c) => reply(c, { areas: areas.list() }));

  app.post("/v1/staging", async (c) => reply(c, await areas.create(parseBody(CreateBody, c.get("body"))), 201));

  app.post("/v1/staging/:id/commit", async (c) => {
    const version = await areas.commit(c.req.param("id"));
    c.header("location", `/v1/checkpoints/${version.id}`);
    return reply(c, version.summary(), 201);
  });

  app.delete("/v1/staging/:id", async (c) => reply(c, { deleted: await areas.delete(c.req.param("id")) }));
}
