/**
 * Whom a pull fetches from: the sources of the version asked for (pull/choose.ts for the
 * membership, or the daemons named), each one's manifest asked over the signed peer API and
 * checked (pull/manifest.ts); those that answer with the same version and the same account of
 * the bytes between tensors are kept, and the others named in the log.
 */
import { ANY_NODE } from "../auth/signature.ts";
import { DaemonError } from "../errors.ts";
import { peerCall } from "../update/peers.ts";
import { chooseVersion } from "./choose.ts";
import { checkManifest, type Manifest } from "./manifest.ts";
import type { PullDeps, PullRequest } from "./pull.ts";

const MANIFEST_TIMEOUT_MS = 10_000;

/** A source that answered, with its manifest. */
export type Found = Manifest & { url: string };

/** The sources to ask, with the node id each request is signed for. */
async function candidates(
  req: PullRequest,
  deps: PullDeps,
): Promise<{ fp?: string; asks: { nodeId: string; url: string }[] }> {
  if (req.from === "peers") {
    const choice = chooseVersion(deps.holders(), req.name, req.fingerprint);
    if ("why" in choice) throw new DaemonError("no_source", choice.why);
    return { fp: choice.fingerprint, asks: choice.sources.map((h) => ({ nodeId: h.nodeId, url: h.url })) };
  }
  const asks = await Promise.all(
    req.from.map(async (url) => {
      const base = url.replace(/\/+$/, "");
      const info = await peerCall<{ nodeId?: string }>(
        deps.sign,
        `${base}/v1/peer/info`,
        { to: ANY_NODE },
        MANIFEST_TIMEOUT_MS,
      ).catch(() => undefined);
      return info?.status === 200 && typeof info.body.nodeId === "string"
        ? { nodeId: info.body.nodeId, url: base }
        : undefined;
    }),
  );
  const unique = new Map(asks.filter((a) => a !== undefined).map((a) => [a.nodeId, a]));
  return { fp: req.fingerprint, asks: [...unique.values()] };
}

/** Asks every candidate for its manifest; keeps those of the one fingerprint (the first answer's, unless asked). */
export async function findSources(req: PullRequest, deps: PullDeps): Promise<{ found: Found[]; leftOut: string[] }> {
  const { fp, asks } = await candidates(req, deps);
  const why: string[] = [];
  const answers = await Promise.all(
    asks.map(async (a) => {
      try {
        const ask = () =>
          peerCall<unknown>(
            deps.sign,
            `${a.url}/v1/peer/pull`,
            { method: "POST", to: a.nodeId, json: { name: req.name, ...(fp ? { fingerprint: fp } : {}) } },
            MANIFEST_TIMEOUT_MS,
          );
        // A kept-alive connection the source closed as this request went out fails it at once:
        // asking for a manifest changes nothing there, so it is asked once more.
        const res = await ask().catch((err) => (closedUnderneath(err) ? ask() : Promise.reject(err)));
        if (res.status !== 200)
          throw new Error((res.body as { error?: { message?: string } }).error?.message ?? `HTTP ${res.status}`);
        const claimed = (res.body as { fingerprint?: unknown }).fingerprint;
        const manifest = checkManifest(res.body, fp ?? (typeof claimed === "string" ? claimed : ""));
        // Who answered is the daemon the request was signed for, whatever its manifest says.
        if (manifest.nodeId !== a.nodeId) throw new Error(`answered as ${manifest.nodeId}, not ${a.nodeId}`);
        return { url: a.url, manifest };
      } catch (err) {
        why.push(`${a.url}: ${reason(err)}`);
        return undefined;
      }
    }),
  );
  const ok = answers.filter((a) => a !== undefined);
  const first = ok[0]?.manifest;
  // The fingerprint binds the tensors; the bytes between them (headers) only the sources'
  // word: every source kept must say the same of them.
  const gaps = JSON.stringify(first?.gaps);
  const same = ok.filter(
    (a) => a.manifest.fingerprint === first?.fingerprint && JSON.stringify(a.manifest.gaps) === gaps,
  );
  for (const a of ok) {
    if (a.manifest.fingerprint !== first?.fingerprint) why.push(`${a.url}: holds another version`);
    else if (!same.includes(a)) why.push(`${a.url}: its headers differ from those of ${ok[0]?.url}`);
  }
  if (same.length === 0) {
    throw new DaemonError("no_source", `no source could give "${req.name}": ${why.join("; ") || "none was found"}`);
  }
  for (const w of why) deps.log.warn({ checkpoint: req.name, source: w }, "pull source left out");
  return { found: same.map((a) => ({ ...a.manifest, url: a.url })), leftOut: why };
}

/** A request that failed because its connection was closed under it (not for a reason of the peer's). */
function closedUnderneath(err: unknown): boolean {
  const code = (err as { cause?: { code?: string } }).cause?.code;
  return code === "UND_ERR_SOCKET" || code === "ECONNRESET";
}

/** An error's message, with its cause's when it has one ("fetch failed" says little alone). */
function reason(err: unknown): string {
  const e = err as Error & { cause?: { code?: string; message?: string } };
  const cause = e.cause?.code ?? e.cause?.message;
  return cause ? `${e.message} (${cause})` : e.message;
}
