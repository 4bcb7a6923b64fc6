import { join } from "node:path";
import type { Hono } from "hono";
import * as v from "valibot";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import type { FilePolicy } from "./confine.ts";
import { type CheckpointVersion, checkName, type Registry } from "./registry.ts";
import { INDEX_FILE, resolveDirectory, resolveFiles } from "./sources.ts";

const PullSpec = v.strictObject({
  /** "peers": every up peer holding it; or these daemons' URLs. */
  from: v.optional(
    v.union([v.literal("peers"), v.pipe(v.array(v.pipe(v.string(), v.url())), v.minLength(1), v.maxLength(1000))]),
    "peers",
  ),
  fingerprint: v.optional(v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/, "must be 64 hex digits"))),
});
export type PullSpec = v.InferOutput<typeof PullSpec>;

const RegisterBody = v.pipe(
  v.strictObject({
    name: v.string(),
    dir: v.optional(v.string()),
    files: v.optional(v.array(v.string())),
    /** Pull it from peers instead of reading files. */
    pull: v.optional(PullSpec),
    /** Read into pinned memory even from tmpfs. */
    copy: v.optional(v.boolean(), false),
    /** The daemon owns the files from now on and deletes them when the version is dropped. */
    adopt: v.optional(v.boolean(), false),
    /** Answer once registered (201) rather than at once (202). */
    wait: v.optional(v.boolean(), true),
  }),
  v.check(
    (b) => [b.dir, b.files, b.pull].filter((x) => x !== undefined).length === 1,
    "give exactly one of dir, files and pull",
  ),
);

/** GET|POST /v1/checkpoints, GET|DELETE /v1/checkpoints/{name}[@N]. */
export function checkpointRoutes(
  app: Hono<{ Variables: { body: unknown } }>,
  registry: Registry,
  budgetBytes: number,
  files: FilePolicy,
  pull: (name: string, spec: PullSpec) => Promise<CheckpointVersion>,
) {
  app.get("/v1/checkpoints", (c) =>
    reply(c, {
      checkpoints: registry.list().map((x) => x.summary()),
      pinnedBytes: registry.pinnedBytes(),
      budgetBytes,
    }),
  );

  app.post("/v1/checkpoints", async (c) => {
    const body = parseBody(RegisterBody, c.get("body"));
    checkName(body.name);
    if (body.pull) {
      const version = await pull(body.name, body.pull);
      c.header("location", `/v1/checkpoints/${version.id}`);
      return body.wait ? reply(c, await version.finished(), 201) : reply(c, version.summary(), 202);
    }
    // Before anything is listed or read (the index too), so nothing outside the roots is probed.
    const named = body.dir !== undefined ? [body.dir, join(body.dir, INDEX_FILE)] : (body.files ?? []);
    for (const path of named) await files.confine(path);
    const source = body.dir !== undefined ? resolveDirectory(body.dir) : resolveFiles(body.files ?? []);
    const version = await registry.register({ name: body.name, source, copy: body.copy, adopt: body.adopt });
    c.header("location", `/v1/checkpoints/${version.id}`);
    if (!body.wait) return reply(c, version.summary(), 202);
    return reply(c, await version.finished(), 201);
  });

  app.get("/v1/checkpoints/:ref", (c) => reply(c, registry.get(c.req.param("ref")).manifest()));

  app.delete("/v1/checkpoints/:ref", async (c) => {
    const deleted = await registry.delete(c.req.param("ref"));
    return reply(c, { deleted: deleted.map((x) => x.id) });
  });
}
