/**
 * Target 4: the peer API (/v1/peer/*). Requests unsigned, badly signed, signed for another
 * request, with a skewed timestamp, replayed, or validly signed (with the daemon's cluster
 * secret) with mutated bodies. An invalid signature must get a 401 and leave no trace; every
 * answer is below 500 in the one error shape, but for a plan that was accepted and then
 * failed while it ran (502 update_failed, the record in its details).
 */
import { bodyHashOf, sign, signedHeaders } from "../../daemon/auth/signature.ts";
import { bodyOf, codeOf, wrongAnswer } from "./answers.ts";
import type { Answer, Call, ChildDaemon } from "./daemon.ts";
import { FindingError } from "./findings.ts";
import { cborBytes, jsonBytes, mutateBytes, mutateValue, percentEncoded, randomValue, stringify } from "./mutate.ts";
import type { Rng } from "./rng.ts";
import type { Target } from "./run.ts";

/** Update ids of plans sent without a valid signature carry this, so a trace of one can be found. */
const UNSIGNED_MARK = "fz-unsigned";

type Signing = "valid" | "none" | "garbage" | "other-secret" | "other-request" | "skewed" | "replayed" | "bad-body";

function plan(update: string, geometry: { slots: number; slotBytes: number }, rng: Rng): Record<string, unknown> {
  return {
    update,
    coordinator: "fuzz",
    checkpoint: { name: "fz", fingerprint: rng.hex(16) },
    comm: { key: "k", id: rng.hex(rng.pick([0, 2, 256])), fresh: rng.chance(0.2), nranks: rng.pick([1, 2]) },
    firstRank: rng.pick([0, 1]),
    slots: geometry.slots,
    slotBytes: geometry.slotBytes,
    buckets: rng.chance(0.5)
      ? []
      : [
          {
            index: 0,
            owner: rng.pick([0, 5]),
            slot: 0,
            bytes: 16,
            pieces: [
              {
                name: "w",
                dtype: "F32",
                shape: [2, 2],
                bytes: 16,
                slotOffset: 0,
                range: [0, 16],
                file: 0,
                fileOffset: 88,
              },
            ],
          },
        ],
  };
}

function pickSigning(rng: Rng): Signing {
  const k = rng.next();
  if (k < 0.45) return "valid";
  return rng.pick(["none", "garbage", "other-secret", "other-request", "skewed", "replayed", "bad-body"] as const);
}

/** The request's headers for a way of signing it. */
function headersFor(d: ChildDaemon, how: Signing, call: Call, rng: Rng): Record<string, string> {
  const url = `http://127.0.0.1:${d.port}${call.path}`;
  const body = call.body ?? new Uint8Array();
  const now = Date.now();
  // Info may be asked of anyone ("*"); everything else is signed for this daemon's node id.
  const to = call.path.startsWith("/v1/peer/info") && rng.chance(0.5) ? "*" : d.nodeId;
  switch (how) {
    case "none":
      return rng.chance(0.5) ? { authorization: `Bearer ${d.adminToken}` } : {};
    case "garbage":
      return {
        "x-ckptd-timestamp": rng.pick([String(now), "", "-1", "1e3", "99999999999999999", `${now}.5`, " 1"]),
        "x-ckptd-signature": rng.pick([rng.hex(64), rng.hex(63), rng.hex(64).toUpperCase(), "", "zz".repeat(32)]),
        "x-ckptd-body-sha256": rng.pick([bodyHashOf(body), rng.hex(64), "", rng.hex(65)]),
      };
    case "other-secret":
      return signedHeaders(Buffer.from(`${d.secret.toString()}x`), call.method, url, to, body, now);
    case "other-request": {
      const h = signedHeaders(d.secret, call.method, url, to, body, now);
      const other = rng.pick(["GET", "POST", "/v1/peer/info", "/v1/peer/updates", "body", "node"]);
      if (other === "body")
        return signedHeaders(d.secret, call.method, url, to, Buffer.concat([body, Buffer.from([1])]), now);
      if (other === "node") return signedHeaders(d.secret, call.method, url, `${d.nodeId}-other`, body, now);
      const [m, target] = other.startsWith("/") ? [call.method, other] : [other, call.path];
      const ts = h["x-ckptd-timestamp"] as string;
      return {
        ...h,
        "x-ckptd-signature": sign(d.secret, m, `${target}${target === call.path ? "x" : ""}`, to, ts, bodyHashOf(body)),
      };
    }
    case "skewed": {
      const skew = rng.pick([1, -1]) * rng.pick([30_500, 60_000, 3_600_000, now]);
      return signedHeaders(d.secret, call.method, url, to, body, now + skew);
    }
    case "bad-body": {
      const h = signedHeaders(d.secret, call.method, url, to, mutateBytes(body, rng), now);
      return {
        ...h,
        "x-ckptd-body-sha256":
          bodyHashOf(body) === h["x-ckptd-body-sha256"] ? rng.hex(64) : (h["x-ckptd-body-sha256"] as string),
      };
    }
    default:
      return signedHeaders(d.secret, call.method, url, to, body, now);
  }
}

/** The request of an input: a route, a body mutated from a valid one, encoded as JSON or CBOR. */
function request(rng: Rng, update: string, geometry: { slots: number; slotBytes: number }): Call {
  const route = rng.int(0, 9);
  if (route < 2) {
    const q = rng.chance(0.5)
      ? `?checkpoint=${percentEncoded(stringify(randomValue(rng)).slice(0, 2000))}&fingerprint=${rng.hex(16)}`
      : "";
    return { method: "GET", path: `/v1/peer/info${q.slice(0, 4000)}` };
  }
  const abort = route < 4;
  const base = abort ? { reason: "fuzz" } : plan(update, geometry, rng);
  const value = rng.chance(0.2) ? base : rng.chance(0.1) ? randomValue(rng) : mutateValue(base, rng);
  const cbor = rng.chance(0.3);
  const body = cbor ? cborBytes(value, rng) : rng.chance(0.1) ? mutateBytes(jsonBytes(value), rng) : jsonBytes(value);
  const path = abort
    ? `/v1/peer/updates/${percentEncoded(update)}/abort`
    : rng.pick(["/v1/peer/updates", "/v1/peer/updates?x=1", "/v1/peer/nothing"]);
  return { method: "POST", path, body, headers: { "content-type": cbor ? "application/cbor" : "application/json" } };
}

/** A plan that ran and failed is a 502 update_failed carrying its record; anything else of 5xx is wrong. */
function ranAndFailed(a: Answer): boolean {
  if (a.status !== 502 || codeOf(a) !== "update_failed") return false;
  const details = (bodyOf(a) as { error: { details?: { id?: unknown } } }).error.details;
  return typeof details?.id === "string";
}

export function peerTarget(d: ChildDaemon): Target {
  let geometry = { slots: 4, slotBytes: 1 << 20 };
  let traced = 0;
  return {
    name: "peer",
    concurrency: 2,
    async one(rng, index) {
      if (index === 0 || geometry.slots === 0) {
        const url = `http://127.0.0.1:${d.port}/v1/peer/info`;
        const info = await d.call({
          method: "GET",
          path: "/v1/peer/info",
          headers: signedHeaders(d.secret, "GET", url, "*"),
        });
        geometry = bodyOf(info) as typeof geometry;
      }
      const how = pickSigning(rng);
      const update = how === "valid" || how === "replayed" ? `u-${index}` : `${UNSIGNED_MARK}-${index}`;
      const call = request(rng, update, geometry);
      call.headers = { ...call.headers, ...headersFor(d, how, call, rng) };
      const what = `${call.method} ${call.path.slice(0, 100)} (${how})`;
      const input = call.body ?? new Uint8Array();
      const send = async () => {
        try {
          return await d.call(call);
        } catch (err) {
          throw new FindingError(`${what}: no answer: ${(err as Error).message}`, input);
        }
      };
      let a = await send();
      if (how === "replayed") {
        const first = wrongAnswer(a, ["update_failed"]);
        if (first && !ranAndFailed(a)) throw new FindingError(`${what}, first send: ${first}`, input);
        a = await send();
      }
      const wrong = wrongAnswer(a, ["update_failed"]);
      if (wrong && !(how === "valid" && ranAndFailed(a))) throw new FindingError(`${what}: ${wrong}`, input);
      if (how !== "valid" && a.status !== 401) throw new FindingError(`${what}: answered ${a.status}, not 401`, input);
    },
    async tidy() {
      const a = await d.call({
        method: "GET",
        path: "/v1/updates",
        headers: { authorization: `Bearer ${d.adminToken}` },
      });
      const ids = (bodyOf(a) as { updates: { id: string }[] }).updates.map((u) => u.id);
      const trace = ids.filter((id) => id.includes(UNSIGNED_MARK));
      if (trace.length > traced) {
        traced = trace.length;
        throw new FindingError(`unsigned plans left update records: ${trace.slice(0, 5).join(", ")}`, trace.join("\n"));
      }
    },
  };
}
