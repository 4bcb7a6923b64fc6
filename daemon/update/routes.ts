import type { Hono } from "hono";
import * as v from "valibot";
import { reply } from "../http/codec.ts";
import { ApiError } from "../http/errors.ts";
import { parseBody } from "../http/validate.ts";
import type { Updates } from "./updates.ts";

const UpdateBody = v.strictObject({
  /** "name" (newest ready version) or "name@N". */
  checkpoint: v.pipe(v.string(), v.minLength(1)),
  /** Answer when the update has ended (default), or at once with 202. */
  wait: v.optional(v.boolean(), true),
});

/** POST /v1/updates, GET /v1/updates, GET /v1/updates/{id}. */
export function updateRoutes(app: Hono<{ Variables: { body: unknown } }>, updates: Updates) {
  app.post("/v1/updates", async (c) => {
    const body = parseBody(UpdateBody, c.get("body"));
    const { record, done } = updates.start(body.checkpoint);
    c.header("location", `/v1/updates/${record.id}`);
    if (!body.wait) return reply(c, record.toJSON(), 202);
    await done;
    if (record.state === "failed") {
      throw new ApiError(
        502,
        record.error?.code ?? "update_failed",
        record.error?.message ?? "update failed",
        record.toJSON(),
      );
    }
    return reply(c, record.toJSON());
  });
  app.get("/v1/updates", (c) => reply(c, { updates: updates.list().map((u) => u.toJSON()) }));
  app.get("/v1/updates/:id", (c) => reply(c, updates.get(c.req.param("id")).toJSON()));
}
