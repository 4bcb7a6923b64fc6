import type { Hono } from "hono";
import * as v from "valibot";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import { DaemonError } from "../errors.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import { withFingerprint } from "./fingerprint.ts";
import type { PeerInfo, PeerPlan } from "./peers.ts";
import type { Updates } from "./updates.ts";

const UpdateBody = v.strictObject({
  /** "name" (newest ready version) or "name@N". */
  checkpoint: v.pipe(v.string(), v.minLength(1)),
  /** Answer when the update has ended (default), or at once with 202. */
  wait: v.optional(v.boolean(), true),
  /** Node ids or URLs of the peers to span (default: every peer that is up, and the seeds). */
  peers: v.optional(v.pipe(v.array(v.pipe(v.string(), v.minLength(1), v.maxLength(500))), v.maxLength(10_000))),
  /** Pull the checkpoint from the peers first when this daemon lacks it: each bucket goes to the local engines once verified. */
  pull: v.optional(v.boolean(), false),
  /** With pull: the version to pull (default: the one the peers' engines got last, else the newest). */
  fingerprint: v.optional(v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/, "must be 64 hex digits"))),
  /** Hash every bucket on its GPU and compare it with the manifest before engines apply it (default: verifyUpdates). */
  verify: v.optional(v.boolean()),
  /** atomic: every engine stages the update and all switch together, or none does (default direct). */
  cutover: v.optional(v.picklist(["direct", "atomic"])),
  /** With cutover atomic: stage at most this many GB/s (engines serve meanwhile). */
  paceGBps: v.optional(v.pipe(v.number(), v.minValue(0.01), v.maxValue(10_000))),
});

/** Starts a pull of `name` (optionally of fingerprint `fp`), resolving once it is under way. */
export type StartPull = (name: string, fp?: string) => Promise<CheckpointVersion>;

const Piece = v.object({
  name: v.string(),
  dtype: v.string(),
  shape: v.array(v.number()),
  bytes: v.number(),
  slotOffset: v.number(),
  range: v.tuple([v.number(), v.number()]),
  file: v.number(),
  fileOffset: v.number(),
});
const PlanBody = v.object({
  update: v.string(),
  coordinator: v.string(),
  checkpoint: v.object({ name: v.string(), fingerprint: v.string() }),
  weightVersion: v.optional(v.pipe(v.string(), v.maxLength(200))),
  comm: v.object({ key: v.string(), id: v.pipe(v.string(), v.hexadecimal()), fresh: v.boolean(), nranks: v.number() }),
  firstRank: v.number(),
  slots: v.number(),
  slotBytes: v.number(),
  buckets: v.array(
    v.object({ index: v.number(), owner: v.number(), slot: v.number(), bytes: v.number(), pieces: v.array(Piece) }),
  ),
  cutover: v.optional(v.picklist(["direct", "atomic"])),
  commitWithinMs: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1))),
  verify: v.optional(v.boolean()),
});

/** POST /v1/updates, GET /v1/updates, GET /v1/updates/{id}, and the peer API (/v1/peer/...). */
export function updateRoutes(
  app: Hono<{ Variables: { body: unknown } }>,
  updates: Updates,
  registry: Registry,
  self: { nodeId: string; gpus: number },
  pull: StartPull,
) {
  /** The version a pull:true update sends: one held here, else one pulled now (still filling). */
  const pulled = async (name: string, fp?: string): Promise<string> => {
    if (name.includes("@"))
      throw new DaemonError(
        "invalid_request",
        "with pull, name the checkpoint without @N (numbers are each daemon's own)",
      );
    const held = fp
      ? withFingerprint(registry.list(), name, fp)
      : registry
          .list()
          .filter((x) => x.name === name && x.state === "ready")
          .at(-1);
    if (held) return held.id;
    updates.assertIdle();
    return (await pull(name, fp)).id;
  };

  app.post("/v1/updates", async (c) => {
    const body = parseBody(UpdateBody, c.get("body"));
    if (body.pull && body.peers)
      throw new DaemonError("invalid_request", "an update with pull goes to this daemon's engines only: give no peers");
    if (!body.pull && body.fingerprint)
      throw new DaemonError("invalid_request", "fingerprint is for updates with pull");
    const ref = body.pull ? await pulled(body.checkpoint, body.fingerprint) : body.checkpoint;
    const peers = body.pull ? [] : body.peers;
    const { record, done } = updates.start(ref, {
      peers,
      filling: body.pull,
      verify: body.verify,
      paceGBps: body.paceGBps,
      cutover: body.cutover,
    });
    c.header("location", `/v1/updates/${record.id}`);
    if (!body.wait) return reply(c, record.toJSON(), 202);
    await done;
    if (record.state === "failed") {
      throw new DaemonError(
        record.error?.code ?? "update_failed",
        record.error?.message ?? "update failed",
        record.toJSON(),
      );
    }
    return reply(c, record.toJSON());
  });
  app.get("/v1/updates", (c) => reply(c, { updates: updates.list().map((u) => u.toJSON()) }));
  app.get("/v1/updates/:id", (c) =>
    reply(c, updates.get(c.req.param("id")).view(["1", "true"].includes(c.req.query("buckets") ?? ""))),
  );

  app.get("/v1/peer/info", async (c) => {
    const held = withFingerprint(registry.list(), c.req.query("checkpoint"), c.req.query("fingerprint"));
    const info: PeerInfo = {
      nodeId: self.nodeId,
      gpus: self.gpus,
      ...(await updates.describe()),
      ...(held ? { holds: held.id } : {}),
    };
    return reply(c, info);
  });
  app.post("/v1/peer/updates", async (c) => {
    const plan = parseBody(PlanBody, c.get("body")) as PeerPlan;
    const record = await updates.participate(plan);
    if (record.state === "failed") {
      throw new DaemonError(record.error?.code ?? "update_failed", record.error?.message ?? "failed", record.toJSON());
    }
    return reply(c, record.toJSON());
  });
  app.post("/v1/peer/updates/:id/staged", async (c) => {
    await updates.staged(c.req.param("id"));
    return reply(c, { staged: true });
  });
  app.post("/v1/peer/updates/:id/commit", (c) => reply(c, { committing: updates.commitOrder(c.req.param("id")) }));
  app.post("/v1/peer/updates/:id/abort", (c) => {
    const reason = (c.get("body") as { reason?: string } | undefined)?.reason ?? "aborted by the coordinator";
    return reply(c, { aborted: updates.abort(c.req.param("id"), reason) });
  });
}
