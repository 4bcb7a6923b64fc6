/**
 * Daemons taking part in one update: the coordinator (the daemon that got POST /v1/updates)
 * asks each configured peer what it has, plans over every GPU of every participant, sends the
 * plan and the communicator id, and every participant moves the same buckets in the same
 * order. A participant that fails makes every other one abort its communicator.
 */
import { createHash } from "node:crypto";
import type { CheckpointVersion } from "../checkpoints/registry.ts";
import type { Bucket } from "./plan.ts";

const fingerprints = new WeakMap<CheckpointVersion, string>();

/** Identifies a version's exact contents and layout, whatever its number on each daemon. */
export function fingerprint(v: CheckpointVersion): string {
  // A ready version never changes, so its fingerprint is computed once.
  const known = v.state === "ready" ? fingerprints.get(v) : undefined;
  if (known) return known;
  const h = createHash("sha256");
  h.update(JSON.stringify(v.files.map((f) => f.size)));
  for (const t of v.tensors) h.update(JSON.stringify([t.name, t.dtype, t.shape, t.bytes, t.file, t.offset, t.hash]));
  const fp = h.digest("hex");
  if (v.state === "ready") fingerprints.set(v, fp);
  return fp;
}

/** GET /v1/peer/info answer. */
export interface PeerInfo {
  nodeId: string;
  gpus: number;
  /** Its bucket geometry, which must equal the coordinator's. */
  slots: number;
  slotBytes: number;
  /** The shared communicator it keeps ("key id"), if any: reused only when every peer has it. */
  comm?: string;
  /** The local id of a ready version with the asked fingerprint, if this daemon holds one. */
  holds?: string;
  /** The update it is busy with, if any. */
  running?: string;
}

/** POST /v1/peer/updates body: everything a participant needs to take part. */
export interface PeerPlan {
  update: string;
  coordinator: string;
  checkpoint: { name: string; fingerprint: string };
  /** Communicator: reuse the one made under `key` (same id), or join `id` afresh. */
  comm: { key: string; id: string; fresh: boolean; nranks: number };
  firstRank: number;
  slots: number;
  slotBytes: number;
  buckets: Bucket[];
}

export interface Participant {
  url: string;
  info: PeerInfo;
  firstRank: number;
}

/** A JSON request to a peer; timeoutMs undefined: no limit. A body that is not JSON becomes an error body. */
async function call<T>(url: string, init: RequestInit, timeoutMs?: number): Promise<{ status: number; body: T }> {
  const res = await fetch(url, timeoutMs === undefined ? init : { ...init, signal: AbortSignal.timeout(timeoutMs) });
  const text = await res.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: { code: "bad_answer", message: text.slice(0, 300) } };
  }
  return { status: res.status, body: body as T };
}

/** Asks a peer for its GPUs and whether it holds the version. */
export async function peerInfo(url: string, name: string, fp: string, timeoutMs: number): Promise<PeerInfo> {
  const q = `${url}/v1/peer/info?checkpoint=${encodeURIComponent(name)}&fingerprint=${fp}`;
  try {
    const { status, body } = await call<PeerInfo & { error?: { message: string } }>(q, {}, timeoutMs);
    if (status !== 200) throw new Error(body.error?.message ?? `status ${status}`);
    return body;
  } catch (err) {
    throw new Error(`peer ${url} did not answer: ${(err as Error).message}`);
  }
}

/** Sends the plan; resolves with the peer's final answer (its update record, or its error). */
export async function peerRun(
  url: string,
  plan: PeerPlan,
): Promise<{ ok: boolean; message?: string; record?: unknown }> {
  try {
    // No time limit here: a dead peer closes the connection, a stuck one stalls the
    // collectives, which the event waits bound.
    const { status, body } = await call<{ error?: { message: string; details?: unknown } }>(`${url}/v1/peer/updates`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(plan),
    });
    if (status === 200) return { ok: true, record: body };
    return { ok: false, message: body.error?.message ?? `status ${status}`, record: body.error?.details };
  } catch (err) {
    return { ok: false, message: String((err as Error)?.message ?? err) };
  }
}

/** Tells a peer to abort an update (best effort). */
export async function peerAbort(url: string, update: string, reason: string, timeoutMs: number): Promise<void> {
  await call(
    `${url}/v1/peer/updates/${encodeURIComponent(update)}/abort`,
    { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ reason }) },
    timeoutMs,
  ).catch(() => undefined);
}
