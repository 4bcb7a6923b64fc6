import { describe, expect, it } from "vitest";
import { thrown } from "../../test/helpers.ts";
import { countRoles, decideAccess, parseTokens, roleOf, routeKind } from "./tokens.ts";

const ADMIN = "admin-token-0123456789";
const READ = "read-token-0123456789ab";
const entries = parseTokens(`# who may do what\nadmin:${ADMIN}\n\n  read:${READ}  \n`, "/etc/ckptd/tokens");

describe("the tokens file", () => {
  it("reads one role:token per line, skipping blank lines and comments", () => {
    expect(entries.map((e) => e.role)).toEqual(["admin", "read"]);
    expect(roleOf(ADMIN, entries)).toBe("admin");
    expect(roleOf(READ, entries)).toBe("read");
    expect(roleOf("admin-token-012345678", entries)).toBeUndefined();
    expect(roleOf("", entries)).toBeUndefined();
  });

  it("keeps digests, not the tokens", () => {
    expect(JSON.stringify(entries)).not.toContain(ADMIN);
  });

  it.each([
    { text: "root:abcdefghijklmnopqrstuvwxyz", message: 'f line 1: expected "read:TOKEN" or "admin:TOKEN"' },
    { text: "abcdefghijklmnopqrstuvwxyz", message: 'f line 1: expected "read:TOKEN" or "admin:TOKEN"' },
    { text: "\nadmin:short", message: "f line 2: a token must be at least 16 characters without spaces" },
    { text: "admin:abcdefgh ijklmnopqrstuvwxyz", message: "f line 1: a token must be at least 16 characters" },
    { text: `admin:${ADMIN}\nread:${ADMIN}`, message: "f line 2: the same token as line 1" },
    { text: "# nothing\n\n", message: 'f: holds no tokens (one "role:token" per line)' },
  ])("refuses $text, naming the line and never the token", ({ text, message }) => {
    const err = thrown(() => parseTokens(text, "f"));
    expect(err.message).toContain(message);
    for (const secret of ["short", "abcdefghijklmnopqrstuvwxyz", ADMIN]) expect(err.message).not.toContain(secret);
  });
});

describe("which requests need what", () => {
  it.each([
    ["GET", "/v1/healthz", "open"],
    ["HEAD", "/v1/healthz", "open"],
    ["POST", "/v1/healthz", "user"],
    ["GET", "/v1/status", "user"],
    ["GET", "/", "user"],
    ["GET", "/metrics", "user"],
    ["GET", "/v1/peer/info", "peer"],
    ["POST", "/v1/peer/updates", "peer"],
    ["POST", "//v1//peer/updates", "peer"],
    ["GET", "/v1/peer", "peer"],
    ["GET", "/v1/peers", "user"],
    ["GET", "/v1/healthz/x", "user"],
  ])("%s %s is %s", (method, path, kind) => {
    expect(routeKind(method, path)).toBe(kind);
  });

  it.each([
    {
      method: "GET",
      auth: undefined,
      want: { ok: false, code: "unauthorized", message: /needs an Authorization: Bearer/ },
    },
    {
      method: "GET",
      auth: `Basic ${ADMIN}`,
      want: { ok: false, code: "unauthorized", message: /must be "Bearer <token>"/ },
    },
    { method: "GET", auth: "Bearer", want: { ok: false, code: "unauthorized" } },
    {
      method: "GET",
      auth: "Bearer wrong-token-0123456789",
      want: { ok: false, code: "unauthorized", message: /not valid/ },
    },
    { method: "GET", auth: `Bearer ${ADMIN} extra`, want: { ok: false, code: "unauthorized" } },
    { method: "GET", auth: `Bearer ${READ}`, want: { ok: true, role: "read" } },
    { method: "HEAD", auth: `Bearer ${READ}`, want: { ok: true, role: "read" } },
    { method: "GET", auth: `bearer  ${ADMIN}`, want: { ok: true, role: "admin" } },
    { method: "POST", auth: `Bearer ${ADMIN}`, want: { ok: true, role: "admin" } },
    { method: "DELETE", auth: `Bearer ${ADMIN}`, want: { ok: true, role: "admin" } },
    {
      method: "POST",
      auth: `Bearer ${READ}`,
      want: { ok: false, code: "forbidden", message: "POST /v1/x needs an admin token; this one may only read" },
    },
    { method: "DELETE", auth: `Bearer ${READ}`, want: { ok: false, code: "forbidden" } },
    { method: "PUT", auth: `Bearer ${READ}`, want: { ok: false, code: "forbidden" } },
  ])("$method with $auth: $want.code", ({ method, auth, want }) => {
    const got = decideAccess(method, "/v1/x", auth, entries);
    const { message, ...rest } = want as { message?: RegExp | string };
    expect(got).toMatchObject(rest);
    if (message) expect((got as { message: string }).message).toMatch(message);
    if (!got.ok) expect(got.message).not.toContain(ADMIN);
  });
});

describe("the tokens file, edges", () => {
  it("takes a token of exactly the minimum length, spaces around the parts and CRLF line ends", () => {
    const sixteen = "0123456789abcdef";
    const got = parseTokens(`# c\r\n   \n  # indented\n admin : ${sixteen} \r\nread:${READ}\r\n`, "f");
    expect(got.map((e) => e.role)).toEqual(["admin", "read"]);
    expect(roleOf(sixteen, got)).toBe("admin");
    expect(thrown(() => parseTokens(`admin:${sixteen.slice(1)}`, "f")).message).toBe(
      "f line 1: a token must be at least 16 characters without spaces",
    );
    expect(thrown(() => parseTokens(`admin:${sixteen}\tx`, "f")).message).toBe(
      "f line 1: a token must be at least 16 characters without spaces",
    );
  });

  it("counts lines from 1, comments and blank lines included", () => {
    expect(thrown(() => parseTokens(`# a\n\nadmin:${ADMIN}\n#\n:${READ}`, "f")).message).toBe(
      'f line 5: expected "read:TOKEN" or "admin:TOKEN"',
    );
    expect(thrown(() => parseTokens(`read:${READ}\n# x\nadmin:${READ}`, "f")).message).toBe(
      "f line 3: the same token as line 1",
    );
  });

  it("counts the tokens of each role", () => {
    const many = parseTokens(`admin:${ADMIN}\nread:${READ}\nread:${READ}x\n`, "f");
    expect(countRoles(many)).toEqual({ read: 2, admin: 1 });
    expect(countRoles([])).toEqual({ read: 0, admin: 0 });
  });
});

describe("the Authorization header, edges", () => {
  it.each([
    [`Bearer\t${ADMIN}`, { ok: true, role: "admin" }],
    [`BEARER ${ADMIN}\t `, { ok: true, role: "admin" }],
    [`Bearer ${ADMIN}x`, { ok: false, code: "unauthorized", message: "the token is not valid" }],
    [
      ` Bearer ${ADMIN}`,
      { ok: false, code: "unauthorized", message: 'the Authorization header must be "Bearer <token>"' },
    ],
    [
      `Bearer${ADMIN}`,
      { ok: false, code: "unauthorized", message: 'the Authorization header must be "Bearer <token>"' },
    ],
    ["Bearer  ", { ok: false, code: "unauthorized", message: 'the Authorization header must be "Bearer <token>"' }],
    [
      "",
      {
        ok: false,
        code: "unauthorized",
        message: "this route needs an Authorization: Bearer <token> header (see the tokens file)",
      },
    ],
  ])("%j", (auth, want) => {
    expect(decideAccess("GET", "/v1/x", auth, entries)).toEqual(want);
  });

  it("lets a read token GET and HEAD only, naming the request it refused", () => {
    expect(decideAccess("PATCH", "/v1/checkpoints/m", `Bearer ${READ}`, entries)).toEqual({
      ok: false,
      code: "forbidden",
      message: "PATCH /v1/checkpoints/m needs an admin token; this one may only read",
    });
    expect(decideAccess("HEAD", "/v1/x", `Bearer ${READ}`, entries)).toEqual({ ok: true, role: "read" });
  });

  it("routes a peer path however many slashes it has, and only /v1/healthz is open", () => {
    expect(routeKind("GET", "/v1///peer")).toBe("peer");
    expect(routeKind("GET", "//v1/healthz")).toBe("open");
    expect(routeKind("GET", "/v1/peerx/y")).toBe("user");
    expect(routeKind("GET", "/x/v1/peer/y")).toBe("user");
    expect(routeKind("DELETE", "/v1/healthz")).toBe("user");
  });
});
