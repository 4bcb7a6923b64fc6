import { chmodSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { signedHeaders } from "../daemon/auth/signature.ts";
import { resolveConfig } from "../daemon/config/index.ts";
import {
  ADMIN_TOKEN,
  AUTH,
  CLUSTER_SECRET,
  daemonCommand,
  type Running,
  type RuntimeName,
  run,
  startProcess,
  tempDir,
  testCredentials,
  thrown,
} from "./helpers.ts";

const status = (d: Running, token: string) =>
  fetch(`${d.url}/v1/status`, { headers: { authorization: `Bearer ${token}` } });

async function stop(d: Running) {
  d.proc.kill("SIGTERM");
  expect(await d.exited).toBe(0);
}

describe("credentials files refused at start", () => {
  it.each([
    { name: "a tokens file readable by group", file: "tokens", mode: 0o640, flag: "--tokens-file" },
    { name: "a tokens file readable by others", file: "tokens", mode: 0o604, flag: "--tokens-file" },
    { name: "a secret file readable by others", file: "cluster-secret", mode: 0o604, flag: "--cluster-secret-file" },
  ])("exits 2 with one line naming $name", async ({ file, mode, flag }) => {
    const creds = testCredentials();
    const path = file === "tokens" ? creds.tokensFile : creds.clusterSecretFile;
    chmodSync(path, mode);
    const other =
      flag === "--tokens-file"
        ? ["--cluster-secret-file", creds.clusterSecretFile]
        : ["--tokens-file", creds.tokensFile];
    const result = await run(daemonCommand("node"), ["--port", "0", "--state-dir", tempDir(), flag, path, ...other]);
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    expect(result.stderr.trim().split("\n")).toHaveLength(1);
    expect(result.stderr).toContain(`${path} has mode 0${mode.toString(8)}`);
    expect(result.stderr).not.toContain(ADMIN_TOKEN);
    expect(result.stderr).not.toContain(CLUSTER_SECRET);
  });

  it("exits 2 naming the line of a malformed tokens file, never its content", async () => {
    const creds = testCredentials();
    writeFileSync(creds.tokensFile, `admin:${ADMIN_TOKEN}\nroot:${ADMIN_TOKEN}x\n`);
    const result = await run(daemonCommand("node"), ["--state-dir", tempDir(), "--tokens-file", creds.tokensFile]);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`ckptd: config: ${creds.tokensFile} line 2: expected "read:TOKEN" or "admin:TOKEN"\n`);
  });

  it("lists the new keys in --help, with no secret", async () => {
    const result = await run(daemonCommand("node"), ["--help"], { CKPTD_CLUSTER_SECRET: CLUSTER_SECRET });
    for (const flag of ["--tokens-file", "--cluster-secret", "--cluster-secret-file"])
      expect(result.stdout).toContain(flag);
    expect(result.stdout).not.toContain(CLUSTER_SECRET);
  });
});

it.each([
  { name: "too short", value: "short-secret" },
  { name: "not a string", value: 1234567890123456 },
])("refuses a cluster secret that is $name without echoing it", ({ value }) => {
  const err = thrown(() =>
    resolveConfig({ file: { clusterSecret: value }, filePath: "/etc/ckptd.json", env: {}, flags: {} }, {}),
  );
  expect(err.message).toMatch(/^clusterSecret \(from \/etc\/ckptd.json\): must be/);
  expect(err.message).not.toContain(String(value));
});

describe("credentials made at first start", () => {
  it("creates stateDir/tokens (0600, one admin token) and stateDir/cluster-secret, says where, and uses them", async () => {
    const stateDir = tempDir();
    const d = await startProcess(daemonCommand("node"), [], {}, { credentials: false, stateDir });
    const tokensFile = join(stateDir, "tokens");
    const secretFile = join(stateDir, "cluster-secret");
    expect(statSync(tokensFile).mode & 0o777).toBe(0o600);
    expect(statSync(secretFile).mode & 0o777).toBe(0o600);
    const lines = readFileSync(tokensFile, "utf8").trim().split("\n");
    expect(lines).toHaveLength(1);
    const [role, token] = (lines[0] as string).split(":") as [string, string];
    expect(role).toBe("admin");
    expect(token.length).toBeGreaterThanOrEqual(32);
    const first = JSON.parse(d.logs[0] as string);
    expect(first.msg).toContain(`created ${tokensFile} and ${secretFile} (0600)`);
    expect(first.msg).toContain(`cut -d: -f2 ${tokensFile}`);

    expect((await status(d, "wrong-token-0123456789")).status).toBe(401);
    const res = await status(d, token);
    expect(res.status).toBe(200);
    const body = await res.text();
    const secret = readFileSync(secretFile, "utf8").trim();
    for (const text of [body, d.logs.join("\n")]) {
      expect(text).not.toContain(token);
      expect(text).not.toContain(secret);
    }
    await stop(d);

    // The next start keeps them.
    const again = await startProcess(daemonCommand("node"), [], {}, { credentials: false, stateDir });
    expect((await status(again, token)).status).toBe(200);
    expect(JSON.parse(again.logs[0] as string).msg).not.toContain("created");
    await stop(again);
  });
});

describe.each(["node", "deno"] as RuntimeName[])("the peer API under %s", (runtime) => {
  it("takes a signed POST with its JSON body, and refuses it unsigned or sent twice", async () => {
    const d = await startProcess(daemonCommand(runtime));
    const url = `${d.url}/v1/peer/updates/u-9@x/abort`;
    const body = new TextEncoder().encode(JSON.stringify({ reason: "test" }));
    const { nodeId } = (await (await fetch(`${d.url}/v1/status`, { headers: AUTH })).json()) as { nodeId: string };
    const headers = {
      ...signedHeaders(Buffer.from(CLUSTER_SECRET), "POST", url, nodeId, body),
      "content-type": "application/json",
    };
    const post = (h: Record<string, string>) => fetch(url, { method: "POST", headers: h, body });
    const res = await post(headers);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ aborted: false });
    const again = await post(headers);
    expect(again.status).toBe(401);
    expect(((await again.json()) as { error: { message: string } }).error.message).toMatch(/already used/);
    expect((await post({ ...AUTH, "content-type": "application/json" })).status).toBe(401);
    // Signed for another daemon of the cluster: refused, naming both.
    const elsewhere = await post({ ...signedHeaders(Buffer.from(CLUSTER_SECRET), "POST", url, "other", body) });
    expect(elsewhere.status).toBe(401);
    expect(((await elsewhere.json()) as { error: { message: string } }).error.message).toBe(
      `the request was signed for node other, not for this daemon (${nodeId})`,
    );
    await stop(d);
  });
});

describe.each(["node", "deno"] as RuntimeName[])("SIGHUP under %s", (runtime) => {
  it("reads the tokens and the secret again: a new token works, the old one not, and so for the secret", async () => {
    const creds = testCredentials();
    const d = await startProcess(daemonCommand(runtime), [
      ...["--tokens-file", creds.tokensFile, "--cluster-secret-file", creds.clusterSecretFile],
    ]);
    const peerInfo = (secret: string) => {
      const url = `${d.url}/v1/peer/info?checkpoint=m&fingerprint=0`;
      return fetch(url, { headers: signedHeaders(Buffer.from(secret), "GET", url, "*") });
    };
    expect((await status(d, ADMIN_TOKEN)).status).toBe(200);
    expect((await peerInfo(CLUSTER_SECRET)).status).toBe(200);
    const fresh = "a-fresh-admin-token-0123456789";
    const freshSecret = "a-fresh-cluster-secret-0123456789";
    writeFileSync(creds.tokensFile, `admin:${fresh}\n`);
    writeFileSync(creds.clusterSecretFile, freshSecret);
    const reloaded = () => d.logs.some((l) => l.includes("credentials reloaded"));
    d.proc.kill("SIGHUP");
    for (let i = 0; i < 100 && !reloaded(); i++) await new Promise((r) => setTimeout(r, 50));
    expect(reloaded()).toBe(true);
    expect((await status(d, fresh)).status).toBe(200);
    expect((await status(d, ADMIN_TOKEN)).status).toBe(401);
    expect((await peerInfo(freshSecret)).status).toBe(200);
    expect((await peerInfo(CLUSTER_SECRET)).status).toBe(401);

    // A file broken on the way keeps the tokens in force, and says why.
    chmodSync(creds.tokensFile, 0o644);
    d.proc.kill("SIGHUP");
    const refused = () => d.logs.some((l) => l.includes("credentials not reloaded"));
    for (let i = 0; i < 100 && !refused(); i++) await new Promise((r) => setTimeout(r, 50));
    expect(d.logs.find((l) => l.includes("credentials not reloaded"))).toContain(`${creds.tokensFile} has mode 0644`);
    expect((await status(d, fresh)).status).toBe(200);
    expect(d.logs.join("\n")).not.toContain(fresh);
    expect(d.logs.join("\n")).not.toContain(freshSecret);
    await stop(d);
  });
});

it("the test daemons run with the test credentials", async () => {
  const d = await startProcess(daemonCommand("node"));
  expect((await fetch(`${d.url}/v1/status`, { headers: AUTH })).status).toBe(200);
  expect((await fetch(`${d.url}/v1/status`)).status).toBe(401);
  expect((await fetch(`${d.url}/v1/healthz`)).status).toBe(200);
  await stop(d);
});
