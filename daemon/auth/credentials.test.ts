import { execFileSync } from "node:child_process";
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { tempDir, thrown } from "../../test/helpers.ts";
import { ConfigError } from "../config/load.ts";
import { Keyring, loadCredentials } from "./credentials.ts";
import { checkSignature } from "./signature.ts";
import { roleOf } from "./tokens.ts";

const TOKEN = "a-token-of-some-length-0123";
const SECRET = "a-secret-of-some-length-0123";

function files(tokensMode = 0o600, secretMode = 0o600) {
  const dir = tempDir();
  const tokensFile = join(dir, "tokens");
  const clusterSecretFile = join(dir, "secret");
  writeFileSync(tokensFile, `read:${TOKEN}\n`);
  writeFileSync(clusterSecretFile, `${SECRET}\n`);
  chmodSync(tokensFile, tokensMode);
  chmodSync(clusterSecretFile, secretMode);
  return { stateDir: join(dir, "state"), tokensFile, clusterSecret: "", clusterSecretFile };
}

describe("loading the credentials", () => {
  it("reads the configured files and makes nothing", () => {
    const s = files(0o600, 0o640); // a secret readable by its group (systemd credentials) is fine
    const { credentials, note } = loadCredentials(s);
    expect(roleOf(TOKEN, credentials.tokens)).toBe("read");
    expect(credentials.secret.toString()).toBe(SECRET);
    expect(note).toEqual({
      tokensFile: s.tokensFile,
      tokens: { read: 1, admin: 0 },
      clusterSecret: s.clusterSecretFile,
      created: [],
    });
    expect(existsSync(s.stateDir)).toBe(false);
  });

  it("makes both files in the state directory when none is configured, 0600", () => {
    const stateDir = join(tempDir(), "state");
    const { note } = loadCredentials({ stateDir, tokensFile: "", clusterSecret: "", clusterSecretFile: "" });
    expect(note.created).toEqual([join(stateDir, "tokens"), join(stateDir, "cluster-secret")]);
    for (const f of note.created) expect(statSync(f).mode & 0o777).toBe(0o600);
    expect(note.tokens).toEqual({ read: 0, admin: 1 });
    expect(
      loadCredentials({ stateDir, tokensFile: "", clusterSecret: "", clusterSecretFile: "" }).note.created,
    ).toEqual([]);
  });

  it("takes an inline secret and makes no secret file", () => {
    const s = { ...files(), clusterSecretFile: "", clusterSecret: SECRET };
    const { credentials, note } = loadCredentials(s);
    expect(credentials.secret.toString()).toBe(SECRET);
    expect(note.clusterSecret).toBe("clusterSecret");
    expect(existsSync(join(s.stateDir, "cluster-secret"))).toBe(false);
  });

  it.each([
    { name: "a tokens file writable by group", modes: [0o620, 0o600], message: /tokens file .* has mode 0620/ },
    { name: "a tokens file readable by others", modes: [0o604, 0o600], message: /has mode 0604: it must not be/ },
    { name: "a secret file writable by group", modes: [0o600, 0o660], message: /cluster secret file .* has mode 0660/ },
    {
      name: "a secret file readable by others",
      modes: [0o600, 0o604],
      message: /cluster secret file .* has mode 0604/,
    },
  ])("refuses $name, naming it", ({ modes, message }) => {
    expect(thrown(() => loadCredentials(files(modes[0], modes[1]))).message).toMatch(message);
  });

  it("refuses a missing configured file, a directory, both secrets, and a short secret", () => {
    const s = files();
    expect(thrown(() => loadCredentials({ ...s, tokensFile: "/nonexistent/tokens" })).message).toMatch(
      /^cannot read tokens file \/nonexistent\/tokens: ENOENT/,
    );
    const dir = join(tempDir(), "d");
    mkdirSync(dir, { mode: 0o700 });
    expect(thrown(() => loadCredentials({ ...s, tokensFile: dir })).message).toBe(
      `tokens file ${dir} is not a regular file`,
    );
    expect(thrown(() => loadCredentials({ ...s, clusterSecret: SECRET })).message).toBe(
      "set clusterSecret or clusterSecretFile, not both",
    );
    writeFileSync(s.clusterSecretFile, "short\n");
    expect(thrown(() => loadCredentials(s)).message).toBe(
      `the cluster secret (${s.clusterSecretFile}) must be at least 16 characters`,
    );
  });

  it.skipIf(process.getuid?.() !== 0)("refuses a file owned by another user", () => {
    const s = files();
    chownSync(s.tokensFile, 4321, 4321);
    expect(thrown(() => loadCredentials(s)).message).toBe(
      `tokens file ${s.tokensFile} is owned by uid 4321, not by this daemon's user (0) or root`,
    );
  });
});

describe("the keyring", () => {
  it("reloads new files, and keeps what it has when they are refused", () => {
    const s = files();
    const logs: string[] = [];
    const log = pino({ level: "info" }, { write: (line: string) => logs.push(line) });
    const keys = new Keyring(s, log);
    writeFileSync(s.tokensFile, `admin:${TOKEN}x\n`);
    expect(keys.reload()).toBe(true);
    expect(roleOf(`${TOKEN}x`, keys.credentials().tokens)).toBe("admin");
    expect(roleOf(TOKEN, keys.credentials().tokens)).toBeUndefined();
    chmodSync(s.tokensFile, 0o644);
    expect(keys.reload()).toBe(false);
    expect(roleOf(`${TOKEN}x`, keys.credentials().tokens)).toBe("admin");
    expect(logs.at(-1)).toContain("credentials not reloaded, the previous ones stay");
    for (const line of logs) {
      expect(line).not.toContain(TOKEN);
      expect(line).not.toContain(SECRET);
    }
  });
});

describe("credentials, more", () => {
  it("makes a working admin token and a 64-digit secret, each file in a 0700 state directory", () => {
    const stateDir = join(tempDir(), "a", "state");
    const { credentials } = loadCredentials({ stateDir, tokensFile: "", clusterSecret: "", clusterSecretFile: "" });
    expect(statSync(stateDir).mode & 0o777).toBe(0o700);
    const [role, token] = readFileSync(join(stateDir, "tokens"), "utf8").trim().split(":") as [string, string];
    expect(role).toBe("admin");
    expect(token).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(roleOf(token, credentials.tokens)).toBe("admin");
    const secret = readFileSync(join(stateDir, "cluster-secret"), "utf8");
    expect(secret).toMatch(/^[0-9a-f]{64}\n$/);
    expect(credentials.secret.toString()).toBe(secret.trim());
  });

  it("makes only what is not configured", () => {
    const s = files();
    const onlyTokens = loadCredentials({ ...s, tokensFile: "" }).note;
    expect(onlyTokens.created).toEqual([join(s.stateDir, "tokens")]);
    expect(onlyTokens.clusterSecret).toBe(s.clusterSecretFile);
    const onlySecret = loadCredentials({ ...s, stateDir: join(s.stateDir, "2"), clusterSecretFile: "" }).note;
    expect(onlySecret.created).toEqual([join(s.stateDir, "2", "cluster-secret")]);
  });

  it("takes a secret of exactly 16 characters, and refuses one of 15", () => {
    const s = files();
    writeFileSync(s.clusterSecretFile, "0123456789abcdef\n");
    expect(loadCredentials(s).credentials.secret.toString()).toBe("0123456789abcdef");
    expect(
      thrown(() => loadCredentials({ ...s, clusterSecretFile: "", clusterSecret: "0123456789abcde" })).message,
    ).toBe("the cluster secret (clusterSecret) must be at least 16 characters");
  });

  it("closes the files it reads, also the ones it refuses", () => {
    const s = files();
    loadCredentials(s);
    chmodSync(s.tokensFile, 0o644);
    thrown(() => loadCredentials(s));
    const open = readdirSync("/proc/self/fd").flatMap((fd) => {
      try {
        return [readlinkSync(`/proc/self/fd/${fd}`)];
      } catch {
        return [];
      }
    });
    expect(open.filter((p) => p === s.tokensFile || p === s.clusterSecretFile)).toEqual([]);
  });

  it("refuses a FIFO in place of a file without waiting for a writer", () => {
    const s = files();
    const fifo = join(tempDir(), "fifo");
    execFileSync("mkfifo", ["-m", "600", fifo]);
    expect(thrown(() => loadCredentials({ ...s, tokensFile: fifo })).message).toBe(
      `tokens file ${fifo} is not a regular file`,
    );
  });

  it("says what is wrong with a tokens file as a ConfigError, and with a short inline secret", () => {
    const s = files();
    writeFileSync(s.tokensFile, "root:abcdefghijklmnopqrstuvwxyz\n");
    const err = thrown(() => loadCredentials(s));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe(`${s.tokensFile} line 1: expected "read:TOKEN" or "admin:TOKEN"`);
    writeFileSync(s.tokensFile, `read:${TOKEN}\n`);
    expect(thrown(() => loadCredentials({ ...s, clusterSecretFile: "", clusterSecret: "short" })).message).toBe(
      "the cluster secret (clusterSecret) must be at least 16 characters",
    );
    expect(thrown(() => loadCredentials(files(0o600, 0o601))).message).toMatch(
      /cluster secret file .* has mode 0601: it must not be accessible by others nor writable by group \(chmod 600 it\)$/,
    );
    expect(thrown(() => loadCredentials(files(0o640, 0o600))).message).toMatch(
      /^tokens file .* has mode 0640: it must not be readable or writable by group or others \(chmod 600 it\)$/,
    );
    expect(thrown(() => loadCredentials({ ...s, clusterSecretFile: "/nonexistent/s" })).message).toMatch(
      /^cannot read cluster secret file \/nonexistent\/s: ENOENT/,
    );
  });

  it("logs where the credentials are, and how to use a token it made", () => {
    const stateDir = join(tempDir(), "state");
    const logs: { msg: string; credentials: unknown }[] = [];
    const log = pino({ level: "info" }, { write: (line: string) => logs.push(JSON.parse(line)) });
    new Keyring({ stateDir, tokensFile: "", clusterSecret: "", clusterSecretFile: "" }, log);
    const tokens = join(stateDir, "tokens");
    const secret = join(stateDir, "cluster-secret");
    expect(logs[0]?.msg).toBe(
      `created ${tokens} and ${secret} (0600); API tokens from ${tokens} (its one admin token: curl -H "Authorization: Bearer $(cut -d: -f2 ${tokens})"); peer requests signed with the cluster secret of ${secret}`,
    );
    expect(logs[0]?.credentials).toEqual({
      tokensFile: tokens,
      tokens: { read: 0, admin: 1 },
      clusterSecret: secret,
      created: [tokens, secret],
    });
    const s = files();
    new Keyring(s, log);
    expect(logs[1]?.msg).toBe(
      `API tokens from ${s.tokensFile}; peer requests signed with the cluster secret of ${s.clusterSecretFile}`,
    );
  });

  it("signs with the secret in force, the new one after a reload", () => {
    const s = files();
    const logs: string[] = [];
    const keys = new Keyring(s, pino({ level: "info" }, { write: (line: string) => logs.push(line) }));
    const url = "http://10.0.0.2:8470/v1/peer/updates";
    const verify = (secret: string, headers: Record<string, string>) =>
      checkSignature(Buffer.from(secret), {
        method: "POST",
        target: "/v1/peer/updates",
        to: headers["x-ckptd-to"],
        timestamp: headers["x-ckptd-timestamp"],
        signature: headers["x-ckptd-signature"],
        bodyHash: headers["x-ckptd-body-sha256"],
      }).ok;
    expect(verify(SECRET, keys.sign("POST", url, "node-b", new Uint8Array([1])))).toBe(true);
    writeFileSync(s.clusterSecretFile, `${SECRET}-new\n`);
    expect(keys.reload()).toBe(true);
    expect(JSON.parse(logs.at(-1) as string).msg).toBe(
      `credentials reloaded: API tokens from ${s.tokensFile}; peer requests signed with the cluster secret of ${s.clusterSecretFile}`,
    );
    expect(JSON.parse(logs.at(-1) as string).credentials).toMatchObject({
      clusterSecret: s.clusterSecretFile,
      created: [],
    });
    const headers = keys.sign("POST", url, "node-b");
    expect(verify(`${SECRET}-new`, headers)).toBe(true);
    expect(verify(SECRET, headers)).toBe(false);
  });
});
