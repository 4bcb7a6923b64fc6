/**
 * The peer API's client and wire types: what a coordinator (the daemon that got POST
 * /v1/updates) asks each configured peer, the plan it sends, and the abort it sends when
 * something failed elsewhere (see coordinate.ts for the flow).
 */
import { ANSWER_HEADER, ANY_NODE, SIGNATURE_HEADER } from "../auth/signature.ts";
import type { Bucket } from "./plan.ts";

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
  /** It takes part in atomic cutovers (/staged, /commit); absent on older daemons. */
  atomic?: boolean;
}

/** POST /v1/peer/updates body: everything a participant needs to take part. */
export interface PeerPlan {
  update: string;
  coordinator: string;
  checkpoint: { name: string; fingerprint: string };
  /** The engines' weight version after the update (the coordinator's name@N+fingerprint). */
  weightVersion?: string;
  /** Communicator: reuse the one made under `key` (same id), or join `id` afresh. */
  comm: { key: string; id: string; fresh: boolean; nranks: number };
  firstRank: number;
  slots: number;
  slotBytes: number;
  buckets: Bucket[];
  /** atomic: stage, answer /staged, and switch only at the coordinator's /commit (default direct). */
  cutover?: "direct" | "atomic";
  /** Atomic: how long after staging the participant waits for /commit (the coordinator retries until then). */
  commitWithinMs?: number;
  /** Verify the buckets on this participant's GPUs too (where it holds the version). */
  verify?: boolean;
}

/**
 * Signs requests to peers with the cluster secret (auth/signature.ts): the headers for a
 * request to the peer of node id `to`, and whether an answer carries the secret's signature.
 */
export interface PeerSigner {
  (method: string, url: string, to: string, body?: Uint8Array): Record<string, string>;
  answered(requestSignature: string, body: Uint8Array, given: string | null): boolean;
}

/**
 * A signed JSON request to a peer; timeoutMs undefined: no limit. A body that is not JSON
 * becomes an error body.
 */
export async function peerCall<T>(
  sign: PeerSigner,
  url: string,
  request: { method?: string; json?: unknown; to: string },
  timeoutMs?: number,
): Promise<{ status: number; body: T }> {
  const method = request.method ?? "GET";
  // Signed as the very bytes that are sent.
  const bytes = request.json === undefined ? undefined : new TextEncoder().encode(JSON.stringify(request.json));
  const headers: Record<string, string> = { ...sign(method, url, request.to, bytes) };
  if (bytes) headers["content-type"] = "application/json";
  const init: RequestInit = { method, headers, ...(bytes ? { body: bytes } : {}) };
  const res = await fetch(url, timeoutMs === undefined ? init : { ...init, signal: AbortSignal.timeout(timeoutMs) });
  const answer = new Uint8Array(await res.arrayBuffer());
  // What a peer says counts only when it holds the cluster secret (an answer to this very request).
  if (res.ok && !sign.answered(headers[SIGNATURE_HEADER] ?? "", answer, res.headers.get(ANSWER_HEADER))) {
    const message = `${url} answered without the cluster secret's signature (no ckptd daemon of this cluster)`;
    return { status: 502, body: { error: { code: "bad_answer", message } } as T };
  }
  const text = new TextDecoder().decode(answer);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: { code: "bad_answer", message: text.slice(0, 300) } };
  }
  return { status: res.status, body: body as T };
}

/** Asks a peer for its GPUs and whether it holds the version. */
export async function peerInfo(
  sign: PeerSigner,
  url: string,
  name: string,
  fp: string,
  timeoutMs: number,
): Promise<PeerInfo> {
  const q = `${url}/v1/peer/info?checkpoint=${encodeURIComponent(name)}&fingerprint=${fp}`;
  try {
    // Asked of whoever answers: this is how the coordinator learns the peer's node id.
    const { status, body } = await peerCall<PeerInfo & { error?: { message: string } }>(
      sign,
      q,
      { to: ANY_NODE },
      timeoutMs,
    );
    if (status !== 200) throw new Error(body.error?.message ?? `status ${status}`);
    return body;
  } catch (err) {
    throw new Error(`peer ${url} did not answer: ${reasonOf(err)}`);
  }
}

/** A peer's final answer to a plan: ok, or what failed there (code: its record's error code). */
export type PeerResult = { ok: true } | { ok: false; message: string; code?: string };

/** Sends the plan; resolves with the peer's final answer. */
export async function peerRun(sign: PeerSigner, url: string, to: string, plan: PeerPlan): Promise<PeerResult> {
  try {
    // No time limit here: a dead peer closes the connection, a stuck one stalls the
    // collectives, which the event waits bound.
    type Failed = { error?: { message: string; details?: { error?: { code?: string } } } };
    const request = { method: "POST", json: plan, to };
    const { status, body } = await peerCall<Failed>(sign, `${url}/v1/peer/updates`, request);
    if (status === 200) return { ok: true };
    return { ok: false, message: body.error?.message ?? `status ${status}`, code: body.error?.details?.error?.code };
  } catch (err) {
    return { ok: false, message: reasonOf(err) };
  }
}

/** A failed fetch's message with its cause ("fetch failed" alone names no reason: TLS, refused, reset). */
function reasonOf(err: unknown): string {
  const e = err as Error & { cause?: { message?: string; code?: string } };
  const cause = e?.cause?.message ?? e?.cause?.code;
  return cause ? `${e.message}: ${cause}` : String(e?.message ?? err);
}

/**
 * Atomic cutover: resolves once the peer's engines have staged the update (its answer to
 * /staged comes then); throws naming the peer when it failed to, or did not within timeoutMs.
 */
export async function peerStaged(sign: PeerSigner, url: string, to: string, update: string, timeoutMs: number) {
  const path = `${url}/v1/peer/updates/${encodeURIComponent(update)}/staged`;
  type Answer = { staged?: boolean; error?: { message: string } };
  const res = await peerCall<Answer>(sign, path, { method: "POST", json: {}, to }, timeoutMs).catch((err: unknown) => ({
    status: 0,
    body: { error: { message: reasonOf(err) } } as Answer,
  }));
  if (res.status !== 200 || res.body.staged !== true) {
    throw new Error(`peer ${url} did not stage the update: ${res.body.error?.message ?? `status ${res.status}`}`);
  }
}

/**
 * Atomic cutover: tells a peer to commit what its engines staged. committing: it does; late:
 * it gave up waiting and dropped its staging; unreached: no answer (try again).
 */
export async function peerCommit(
  sign: PeerSigner,
  url: string,
  to: string,
  update: string,
  timeoutMs: number,
): Promise<"committing" | "late" | "unreached"> {
  const path = `${url}/v1/peer/updates/${encodeURIComponent(update)}/commit`;
  const res = await peerCall<{ committing?: boolean }>(sign, path, { method: "POST", json: {}, to }, timeoutMs).catch(
    () => undefined,
  );
  if (res?.status !== 200) return "unreached";
  return res.body.committing === true ? "committing" : "late";
}

/** Tells a peer to abort an update (best effort). */
export async function peerAbort(
  sign: PeerSigner,
  url: string,
  to: string,
  update: string,
  reason: string,
  timeoutMs: number,
): Promise<void> {
  await peerCall(
    sign,
    `${url}/v1/peer/updates/${encodeURIComponent(update)}/abort`,
    { method: "POST", json: { reason }, to },
    timeoutMs,
  ).catch(() => undefined);
}
