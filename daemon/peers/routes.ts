/**
 * GET /v1/peers and POST /v1/peers (user routes: the fleet as this daemon sees it, and joining
 * one through any of its daemons), and the peer API's POST /v1/peer/heartbeat and
 * POST /v1/peer/leave (signed with the cluster secret).
 */
import type { Hono } from "hono";
import * as v from "valibot";
import { DaemonError } from "../errors.ts";
import { reply } from "../http/codec.ts";
import { parseBody } from "../http/validate.ts";
import type { Gossip, Heartbeat } from "./gossip.ts";
import type { Members, SelfInfo } from "./members.ts";

const url = v.pipe(v.string(), v.maxLength(500), v.url(), v.regex(/^https?:\/\//, "must be an http or https URL"));
const id = v.pipe(v.string(), v.minLength(1), v.maxLength(200));

const SelfSchema = v.object({
  nodeId: id,
  url,
  backend: v.pipe(v.string(), v.maxLength(50)),
  gpus: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(4096)),
  versions: v.pipe(
    v.array(
      v.object({
        name: v.pipe(v.string(), v.maxLength(200)),
        version: v.pipe(v.number(), v.integer(), v.minValue(1)),
        fingerprint: v.pipe(v.string(), v.maxLength(128)),
        bytes: v.pipe(v.number(), v.integer(), v.minValue(0)),
        registeredAt: v.pipe(v.string(), v.maxLength(64)),
      }),
    ),
    v.maxLength(10_000),
  ),
  delivered: v.optional(v.pipe(v.string(), v.maxLength(128))),
  deliveredAt: v.optional(v.pipe(v.string(), v.maxLength(64))),
  startedAt: v.pipe(v.number(), v.integer(), v.minValue(0)),
  beat: v.pipe(v.number(), v.integer(), v.minValue(0)),
});
const HeartbeatSchema = v.object({
  self: SelfSchema,
  members: v.pipe(
    v.array(
      v.object({
        nodeId: id,
        url,
        state: v.picklist(["up", "down", "left"]),
        startedAt: v.pipe(v.number(), v.integer(), v.minValue(0)),
        beat: v.pipe(v.number(), v.integer(), v.minValue(0)),
      }),
    ),
    v.maxLength(100_000),
  ),
});

export function peerRoutes(
  app: Hono<{ Variables: { body: unknown } }>,
  members: Members,
  gossip: Gossip,
  self: () => SelfInfo,
) {
  app.get("/v1/peers", (c) =>
    reply(c, {
      self: self(),
      peers: members.list().map((m) => ({ ...m.info, state: m.state, lastSeen: new Date(m.lastSeen).toISOString() })),
      /** URLs this daemon tries, which have not answered yet. */
      contacting: members.pending(),
    }),
  );
  app.post("/v1/peers", async (c) => {
    const body = parseBody(v.object({ url }), c.get("body"));
    try {
      const m = await gossip.join(body.url);
      return reply(c, { ...m.info, state: m.state, lastSeen: new Date(m.lastSeen).toISOString() });
    } catch (err) {
      throw new DaemonError("peer_unreachable", `cannot join ${body.url}: ${(err as Error).message}`);
    }
  });
  app.post("/v1/peer/heartbeat", (c) => {
    if (gossip.leaving) throw new DaemonError("busy", "this daemon is leaving the fleet");
    gossip.heard(parseBody(HeartbeatSchema, c.get("body")) as Heartbeat, true);
    const answer: Heartbeat = { self: self(), members: members.rumorsOut() };
    return reply(c, answer);
  });
  app.post("/v1/peer/leave", (c) => {
    const body = parseBody(v.object({ nodeId: id }), c.get("body"));
    members.left(body.nodeId, Date.now());
    return reply(c, { left: body.nodeId });
  });
}
