import { chmodSync, chownSync, existsSync, mkdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { tempDir, thrown } from "../../test/helpers.ts";
import { Keyring, loadCredentials } from "./credentials.ts";
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
