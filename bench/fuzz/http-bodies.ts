/**
 * Target 2: JSON and CBOR bodies to every mutating route of the daemon, grammar-mutated from
 * valid ones, with and without a token. Every answer must be below 500, errors in the one
 * shape, and a request without an admin token must be refused (401 or 403) whatever its body.
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { encodeHeader } from "../../daemon/checkpoints/safetensors.ts";
import { bodyOf, wrongAnswer } from "./answers.ts";
import { type Answer, type Call, type ChildDaemon, MAX_BODY_BYTES } from "./daemon.ts";
import { FindingError } from "./findings.ts";
import { cborBytes, jsonBytes, mutateBytes, mutateValue, percentEncoded, randomValue, stringify } from "./mutate.ts";
import type { Rng } from "./rng.ts";
import type { Target } from "./run.ts";
import { makeCase } from "./safetensors.ts";

type Auth = "admin" | "read" | "none" | "bad" | "malformed";

interface Route {
  method: string;
  /** The path, given the ids the fuzzer holds. */
  path(ids: Ids, rng: Rng): string;
  /** A valid body, or undefined for routes that take raw bytes. */
  body?(d: ChildDaemon): unknown;
  /** Raw bytes for PUT routes. */
  raw?(rng: Rng): Uint8Array;
}

interface Ids {
  upload(rng: Rng): string;
  checkpoint(rng: Rng): string;
}

const ODD_SEGMENTS = ["", "%", "%zz", "%E0%A4%A", "%00", "..", "a%2Fb", "%ff%fe", "x@0", "x@1e3", "__proto__", "💥"];

function segment(rng: Rng, known: string | undefined): string {
  if (known && rng.chance(0.6)) return known;
  if (rng.chance(0.5)) return rng.pick(ODD_SEGMENTS);
  if (rng.chance(0.1)) return "a".repeat(rng.int(100, 6000));
  return percentEncoded(stringify(randomValue(rng)).slice(0, 2000));
}

function baseFile(d: ChildDaemon): string {
  return join(d.roots, "base", "model.safetensors");
}

const ROUTES: Route[] = [
  {
    method: "POST",
    path: () => "/v1/checkpoints",
    body: (d) => ({ name: "fz", files: [baseFile(d)], copy: false, wait: true }),
  },
  { method: "POST", path: () => "/v1/checkpoints", body: (d) => ({ name: "fzd", dir: join(d.roots, "base") }) },
  { method: "DELETE", path: (ids, rng) => `/v1/checkpoints/${ids.checkpoint(rng)}` },
  {
    method: "POST",
    path: () => "/v1/uploads",
    body: () => ({ name: "up", tensors: [{ name: "w", dtype: "F32", shape: [2, 2] }], metadata: { a: "b" } }),
  },
  {
    method: "PUT",
    path: (ids, rng) => `/v1/uploads/${ids.upload(rng)}/tensors/${rng.chance(0.8) ? "w" : segment(rng, undefined)}`,
    raw: (rng) => rng.bytes(rng.chance(0.7) ? 16 : rng.int(0, 64)),
  },
  {
    method: "PUT",
    path: (ids, rng) =>
      `/v1/uploads/${ids.upload(rng)}/files/${rng.chance(0.8) ? "model.safetensors" : segment(rng, undefined)}`,
    raw: (rng) => makeCase(rng).bytes,
  },
  { method: "POST", path: (ids, rng) => `/v1/uploads/${ids.upload(rng)}/commit`, body: () => ({ wait: true }) },
  { method: "DELETE", path: (ids, rng) => `/v1/uploads/${ids.upload(rng)}` },
  { method: "POST", path: () => "/v1/updates", body: () => ({ checkpoint: "fz", wait: true }) },
];

const CONTENT_TYPES = [
  "text/plain",
  "application/json; charset=latin1",
  "APPLICATION/CBOR",
  "multipart/form-data; boundary=x",
  "application/octet-stream",
  "application/x-www-form-urlencoded",
  "application/jsonx",
];

function authHeader(d: ChildDaemon, auth: Auth, rng: Rng): Record<string, string> {
  switch (auth) {
    case "admin":
      return { authorization: `Bearer ${d.adminToken}` };
    case "read":
      return { authorization: `Bearer ${d.readToken}` };
    case "bad": {
      // the admin token with its last character changed, or one more appended
      const last = d.adminToken.at(-1) === "0" ? "1" : "0";
      return {
        authorization: `Bearer ${rng.chance(0.5) ? d.adminToken.slice(0, -1) + last : `${d.adminToken}${last}`}`,
      };
    }
    case "malformed":
      return { authorization: rng.pick(["Basic eDp5", "Bearer", "Bearer  ", `Bearer ${d.adminToken} x`, "bearer"]) };
    default:
      return {};
  }
}

/** The body bytes and their content type: the route's valid body mutated, encoded as JSON or CBOR and damaged at times. */
function encodedBody(route: Route, d: ChildDaemon, rng: Rng): { type?: string; bytes?: Uint8Array } {
  if (route.raw && rng.chance(0.7)) return { type: "application/octet-stream", bytes: route.raw(rng) };
  if (rng.chance(0.03)) return { type: "application/json" };
  const base = route.body?.(d) ?? {};
  let value = rng.chance(0.15) ? base : rng.chance(0.1) ? randomValue(rng) : mutateValue(base, rng);
  if (rng.chance(0.02)) value = { ...(base as object), pad: "x".repeat(MAX_BODY_BYTES + rng.int(-64, 4096)) };
  const k = rng.next();
  if (k < 0.55)
    return { type: "application/json", bytes: rng.chance(0.2) ? mutateBytes(jsonBytes(value), rng) : jsonBytes(value) };
  if (k < 0.85) return { type: "application/cbor", bytes: cborBytes(value, rng) };
  if (k < 0.9) return { bytes: jsonBytes(value) };
  return { type: rng.pick(CONTENT_TYPES), bytes: jsonBytes(value) };
}

function pickAuth(rng: Rng): Auth {
  const k = rng.next();
  if (k < 0.85) return "admin";
  if (k < 0.9) return "none";
  if (k < 0.94) return "read";
  return k < 0.97 ? "bad" : "malformed";
}

/** Checks the answer; returns its decoded body when it is a success. */
function judge(a: Answer, auth: Auth, what: string, input: Uint8Array): unknown {
  const wrong = wrongAnswer(a);
  if (wrong) throw new FindingError(`${what}: ${wrong}`, input);
  const want = auth === "admin" ? undefined : auth === "read" ? 403 : 401;
  if (want !== undefined && a.status !== want)
    throw new FindingError(`${what}: answered ${a.status}, not ${want}`, input);
  return a.status < 300 ? bodyOf(a) : undefined;
}

/** The valid checkpoint every base body names (re-made after an input adopted and dropped it). */
function ensureBase(d: ChildDaemon): void {
  if (existsSync(baseFile(d))) return;
  mkdirSync(join(d.roots, "base"), { recursive: true });
  const header = encodeHeader([{ name: "w", dtype: "F32", shape: [2, 2], bytes: 16 }]);
  writeFileSync(baseFile(d), Buffer.concat([header, Buffer.alloc(16)]));
}

export function httpTarget(d: ChildDaemon): Target {
  const uploads: string[] = [];
  const versions = new Set<string>();
  const ids: Ids = {
    upload: (rng) => segment(rng, uploads.length ? rng.pick(uploads) : undefined),
    checkpoint: (rng) => segment(rng, versions.size ? rng.pick([...versions]) : undefined),
  };
  const admin = { authorization: `Bearer ${d.adminToken}` };
  ensureBase(d);
  return {
    name: "http-bodies",
    concurrency: 4,
    async one(rng) {
      const route = rng.pick(ROUTES);
      const auth = pickAuth(rng);
      const { type, bytes } = encodedBody(route, d, rng);
      const headers: Record<string, string> = { ...authHeader(d, auth, rng) };
      if (type) headers["content-type"] = type;
      if (rng.chance(0.2))
        headers.accept = rng.pick(["application/cbor", "application/cbor;q=0.5, application/json", "*/*"]);
      // Node's client sends no raw non-ASCII in a path: those characters go percent-encoded.
      const path = route.path(ids, rng).replace(/[^\x21-\x7e]/gsu, percentEncoded);
      const call: Call = { method: route.method, path, headers, body: bytes };
      const input = bytes ?? new Uint8Array();
      const what = `${call.method} ${call.path.slice(0, 120)} (${auth} token, ${type ?? "no content type"})`;
      let a: Answer;
      try {
        a = await d.call(call);
      } catch (err) {
        throw new FindingError(`${what}: no answer: ${(err as Error).message}`, input);
      }
      const ok = judge(a, auth, what, input) as { id?: string } | undefined;
      if (!ok?.id) return;
      if (call.path === "/v1/uploads") uploads.push(ok.id);
      else versions.add(ok.id.split("@")[0] as string);
    },
    async tidy() {
      const calls = [...versions].map((v) => ({ method: "DELETE", path: `/v1/checkpoints/${encodeURIComponent(v)}` }));
      calls.push(...uploads.splice(0).map((u) => ({ method: "DELETE", path: `/v1/uploads/${u}` })));
      versions.clear();
      for (const c of calls) await d.call({ ...c, headers: admin }).catch(() => undefined);
      ensureBase(d);
    },
  };
}
