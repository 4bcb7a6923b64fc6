/** Which daemons an update spans: a pure function of the membership, the seeds and the request. */
import { DaemonError } from "../errors.ts";
import { type Member, type MemberState, normalize } from "./members.ts";

export interface Span {
  /** The peers' URLs. */
  urls: string[];
  /** Members left out because they are not up, named in the update's result. */
  leftOut: { nodeId: string; url: string; state: MemberState }[];
}

/**
 * Every `up` member, and every seed not heard from yet (`unheard`: Members.unheardSeeds, neither
 * this daemon nor a member; it takes part, and fails the update if it cannot); members `down`
 * or `left` are left out and named. `asked`
 * (node ids or URLs) narrows it to those; one that names no known daemon is a 400.
 */
export function updateSpan(members: Member[], unheard: string[], asked?: string[]): Span {
  let chosen = members;
  let seedsChosen = unheard;
  if (asked !== undefined) {
    const names = asked.map((a) => (a.includes("://") ? normalize(a) : a));
    const missing = names.filter((n) => !members.some((m) => m.nodeId === n || m.url === n) && !unheard.includes(n));
    if (missing.length > 0) {
      throw new DaemonError(
        "invalid_request",
        `peers: ${missing.join(", ")} is no daemon this one knows (GET /v1/peers)`,
      );
    }
    chosen = members.filter((m) => names.includes(m.nodeId) || names.includes(m.url));
    seedsChosen = unheard.filter((u) => names.includes(u));
  }
  return {
    urls: [...chosen.filter((m) => m.state === "up").map((m) => m.url), ...seedsChosen],
    leftOut: chosen.filter((m) => m.state !== "up").map(({ nodeId, url, state }) => ({ nodeId, url, state })),
  };
}
