/**
 * Which version a pull takes, and from whom: pure. Version numbers are each daemon's own, so
 * a version is named across daemons by its fingerprint: the one asked for, else the one most
 * recently delivered to engines by a successful update among the peers that hold it, else
 * the newest registered. Its sources are every peer holding it.
 */
import type { SelfInfo } from "../peers/members.ts";

export type Holder = Pick<SelfInfo, "nodeId" | "url" | "versions" | "delivered" | "deliveredAt">;

export interface Choice {
  fingerprint: string;
  sources: Holder[];
}

export function chooseVersion(holders: readonly Holder[], name: string, fp?: string): Choice | { why: string } {
  const holding = (f: string) => holders.filter((h) => h.versions.some((v) => v.name === name && v.fingerprint === f));
  if (fp !== undefined) {
    const sources = holding(fp);
    if (sources.length > 0) return { fingerprint: fp, sources };
    return { why: `no up peer holds "${name}" with fingerprint ${fp.slice(0, 16)}` };
  }
  const delivered = holders
    .filter((h) => h.delivered && h.deliveredAt && holding(h.delivered).includes(h))
    .sort((a, b) => (b.deliveredAt as string).localeCompare(a.deliveredAt as string))[0];
  if (delivered?.delivered) return { fingerprint: delivered.delivered, sources: holding(delivered.delivered) };
  const newest = holders
    .flatMap((h) => h.versions.filter((v) => v.name === name))
    .sort((a, b) => b.registeredAt.localeCompare(a.registeredAt))[0];
  if (newest) return { fingerprint: newest.fingerprint, sources: holding(newest.fingerprint) };
  return { why: `no up peer holds a version of "${name}"` };
}
