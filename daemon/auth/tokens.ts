/**
 * API tokens: the tokens file (`role:token` per line) and who may do what. Pure functions;
 * tokens are kept only as SHA-256 digests and compared in constant time.
 */
import { createHash, timingSafeEqual } from "node:crypto";

export const ROLES = ["read", "admin"] as const;
export type Role = (typeof ROLES)[number];

/** Shorter tokens are refused: a token is a password that a script may leave lying around. */
export const MIN_TOKEN_LENGTH = 16;

/** One token of the file, as its digest (the token itself is not kept). */
export interface TokenEntry {
  role: Role;
  digest: Buffer;
}

const digest = (token: string) => createHash("sha256").update(token, "utf8").digest();

/**
 * Parses a tokens file: one `role:token` per line; blank lines and `#` comments are skipped.
 * Errors name the line and the rule, never the token.
 */
export function parseTokens(text: string, path: string): TokenEntry[] {
  const entries: TokenEntry[] = [];
  const seen = new Map<string, number>();
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const where = `${path} line ${i + 1}`;
    const colon = line.indexOf(":");
    const role = line.slice(0, Math.max(colon, 0)).trim();
    const token = line.slice(colon + 1).trim();
    if (colon < 0 || !(ROLES as readonly string[]).includes(role)) {
      throw new Error(`${where}: expected "read:TOKEN" or "admin:TOKEN"`);
    }
    if (token.length < MIN_TOKEN_LENGTH || /\s/.test(token)) {
      throw new Error(`${where}: a token must be at least ${MIN_TOKEN_LENGTH} characters without spaces`);
    }
    const d = digest(token);
    const key = d.toString("hex");
    const before = seen.get(key);
    if (before !== undefined) throw new Error(`${where}: the same token as line ${before}`);
    seen.set(key, i + 1);
    entries.push({ role: role as Role, digest: d });
  }
  if (entries.length === 0) throw new Error(`${path}: holds no tokens (one "role:token" per line)`);
  return entries;
}

/** The role of a presented token, comparing against every entry so the time says nothing. */
export function roleOf(token: string, entries: readonly TokenEntry[]): Role | undefined {
  const d = digest(token);
  let found: Role | undefined;
  for (const e of entries) {
    if (timingSafeEqual(d, e.digest) && found === undefined) found = e.role;
  }
  return found;
}

/** How many tokens of each role, for the log (never the tokens). */
export function countRoles(entries: readonly TokenEntry[]): Record<Role, number> {
  return {
    read: entries.filter((e) => e.role === "read").length,
    admin: entries.filter((e) => e.role === "admin").length,
  };
}

/** What a request is: the one open route, the signed peer API, or a route for tokens. */
export type RouteKind = "open" | "peer" | "user";

/** `path` is the path the router matches (percent-decoded). */
export function routeKind(method: string, path: string): RouteKind {
  const p = path.replace(/\/{2,}/g, "/");
  if (p === "/v1/peer" || p.startsWith("/v1/peer/")) return "peer";
  if ((method === "GET" || method === "HEAD") && p === "/v1/healthz") return "open";
  return "user";
}

export type Access = { ok: true; role: Role } | { ok: false; code: "unauthorized" | "forbidden"; message: string };

/** Whether a request to a user route may proceed, by its Authorization header. */
export function decideAccess(
  method: string,
  path: string,
  authorization: string | undefined,
  entries: readonly TokenEntry[],
): Access {
  const match = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(authorization ?? "");
  if (!match) {
    return {
      ok: false,
      code: "unauthorized",
      message: authorization
        ? 'the Authorization header must be "Bearer <token>"'
        : "this route needs an Authorization: Bearer <token> header (see the tokens file)",
    };
  }
  const role = roleOf(match[1] as string, entries);
  if (role === undefined) return { ok: false, code: "unauthorized", message: "the token is not valid" };
  if (role === "read" && method !== "GET" && method !== "HEAD") {
    return { ok: false, code: "forbidden", message: `${method} ${path} needs an admin token; this one may only read` };
  }
  return { ok: true, role };
}
