import type { Context, Hono } from "hono";
import * as v from "valibot";
import { DaemonError } from "../errors.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import type { Registry } from "./registry.ts";
import { DTYPE_BITS } from "./safetensors.ts";
import { Uploads } from "./uploads.ts";

export const TensorDecl = v.strictObject({
  name: v.pipe(v.string(), v.minLength(1)),
  dtype: v.picklist(Object.keys(DTYPE_BITS)),
  shape: v.array(v.pipe(v.number(), v.integer(), v.minValue(0))),
});

const CreateBody = v.strictObject({
  name: v.string(),
  tensors: v.optional(v.array(TensorDecl), []),
  metadata: v.optional(v.record(v.string(), v.string())),
});

const CommitBody = v.optional(v.strictObject({ wait: v.optional(v.boolean(), true) }), {});

/** The raw body of a PUT of bytes, which must say it is application/octet-stream (415 otherwise). */
function octets(c: Context): ReadableStream<Uint8Array> | null {
  const type = c.req.header("content-type") ?? "";
  if (!type.startsWith("application/octet-stream")) {
    throw new DaemonError(
      "unsupported_media_type",
      `uploaded bytes are sent as application/octet-stream, not ${type ? JSON.stringify(type.slice(0, 100)) : "without a content-type"}`,
    );
  }
  return c.req.raw.body;
}

/** GET|POST /v1/uploads, PUT .../tensors/{name}, PUT .../files/{name}, POST .../commit, DELETE. */
export function uploadRoutes(app: Hono<{ Variables: { body: unknown } }>, registry: Registry, uploadDir: string) {
  const uploads = new Uploads(registry, uploadDir);

  app.get("/v1/uploads", (c) => reply(c, { uploads: uploads.list() }));

  app.post("/v1/uploads", async (c) => reply(c, await uploads.create(parseBody(CreateBody, c.get("body"))), 201));

  app.put("/v1/uploads/:id/tensors/:tensor{.+}", async (c) =>
    reply(c, await uploads.putTensor(c.req.param("id"), c.req.param("tensor"), octets(c))),
  );

  app.put("/v1/uploads/:id/files/:file", async (c) =>
    reply(
      c,
      await uploads.putFile(c.req.param("id"), c.req.param("file"), octets(c), Number(c.req.header("content-length"))),
    ),
  );

  app.post("/v1/uploads/:id/commit", async (c) => {
    uploads.get(c.req.param("id")); // a missing or busy upload is named before a bad body
    const body = parseBody(CommitBody, c.get("body"));
    const version = await uploads.commit(c.req.param("id"));
    c.header("location", `/v1/checkpoints/${version.id}`);
    if (!body.wait) return reply(c, version.summary(), 202);
    return reply(c, await version.finished(), 201);
  });

  app.delete("/v1/uploads/:id", async (c) => reply(c, { deleted: await uploads.delete(c.req.param("id")) }));
}
