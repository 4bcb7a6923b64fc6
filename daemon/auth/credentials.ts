/**
 * The daemon's credentials: the API tokens and the cluster secret, read from their files at
 * start (made there on first start when none is configured) and again on SIGHUP.
 */
import { randomBytes } from "node:crypto";
import { closeSync, constants, fstatSync, mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { ConfigError } from "../config/load.ts";
import type { Config } from "../config/schema.ts";
import { checkAnswer, signedHeaders } from "./signature.ts";
import { countRoles, parseTokens, type Role, type TokenEntry } from "./tokens.ts";

export interface Credentials {
  tokens: TokenEntry[];
  secret: Buffer;
}

/** What the daemon logs about its credentials: where they are, never what they are. */
export interface CredentialsNote {
  tokensFile: string;
  tokens: Record<Role, number>;
  /** The file of the cluster secret, or "clusterSecret" when it is inline in the configuration. */
  clusterSecret: string;
  created: string[];
}

type Settings = Pick<Config, "stateDir" | "tokensFile" | "clusterSecret" | "clusterSecretFile">;

/** Tokens, secrets, keys and certificates are small: a larger file is a mistake. */
const MAX_PRIVATE_BYTES = 1 << 20;

/**
 * Reads a file that must stay private: opened once (a FIFO does not block), its mode and
 * owner checked on the open file (no race with a rename), then read. `forbidden`: mode bits
 * that refuse it.
 */

export function readPrivate(path: string, what: string, forbidden: number, rule: string): string {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    throw new ConfigError(`cannot read ${what} ${path}: ${(err as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new ConfigError(`${what} ${path} is not a regular file`);
    if (st.size > MAX_PRIVATE_BYTES) throw new ConfigError(`${what} ${path} is over ${MAX_PRIVATE_BYTES} bytes`);
    const mode = (st.mode & 0o777).toString(8).padStart(4, "0");
    if (st.mode & forbidden) throw new ConfigError(`${what} ${path} has mode ${mode}: ${rule} (chmod 600 it)`);
    const uid = process.getuid?.();
    if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
      throw new ConfigError(`${what} ${path} is owned by uid ${st.uid}, not by this daemon's user (${uid}) or root`);
    }
    return readFileSync(fd, "utf8");
  } finally {
    closeSync(fd);
  }
}

/** Writes a new private file; false if one is there already (then it is read as any other). */
function createPrivate(dir: string, path: string, text: string): boolean {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  try {
    writeFileSync(path, text, { mode: 0o600, flag: "wx" });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw new ConfigError(`cannot create ${path}: ${(err as Error).message}`);
  }
}

/**
 * Loads the tokens and the secret as configured; with none configured, `<stateDir>/tokens`
 * (one admin token) and `<stateDir>/cluster-secret` are made on first start (0600).
 * A problem is a ConfigError naming the file and the rule.
 */
export function loadCredentials(s: Settings): { credentials: Credentials; note: CredentialsNote } {
  const created: string[] = [];
  const tokensFile = s.tokensFile || join(s.stateDir, "tokens");
  if (!s.tokensFile && createPrivate(s.stateDir, tokensFile, `admin:${randomBytes(32).toString("base64url")}\n`)) {
    created.push(tokensFile);
  }
  let tokens: TokenEntry[];
  const text = readPrivate(tokensFile, "tokens file", 0o077, "it must not be readable or writable by group or others");
  try {
    tokens = parseTokens(text, tokensFile);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }

  if (s.clusterSecret && s.clusterSecretFile) {
    throw new ConfigError("set clusterSecret or clusterSecretFile, not both");
  }
  let secret: string;
  let secretSource: string;
  if (s.clusterSecret) {
    secret = s.clusterSecret;
    secretSource = "clusterSecret";
  } else {
    secretSource = s.clusterSecretFile || join(s.stateDir, "cluster-secret");
    if (!s.clusterSecretFile && createPrivate(s.stateDir, secretSource, `${randomBytes(32).toString("hex")}\n`)) {
      created.push(secretSource);
    }
    const rule = "it must not be accessible by others nor writable by group";
    secret = readPrivate(secretSource, "cluster secret file", 0o027, rule).trim();
  }
  if (secret.length < 16) {
    throw new ConfigError(`the cluster secret (${secretSource}) must be at least 16 characters`);
  }
  return {
    credentials: { tokens, secret: Buffer.from(secret, "utf8") },
    note: { tokensFile, tokens: countRoles(tokens), clusterSecret: secretSource, created },
  };
}

function describe(note: CredentialsNote): string {
  const made = note.created.length ? `created ${note.created.join(" and ")} (0600); ` : "";
  const use = note.created.includes(note.tokensFile)
    ? ` (its one admin token: curl -H "Authorization: Bearer $(cut -d: -f2 ${note.tokensFile})")`
    : "";
  return `${made}API tokens from ${note.tokensFile}${use}; peer requests signed with the cluster secret of ${note.clusterSecret}`;
}

/** The credentials in force: loaded at start (logging where they are), replaced on reload. */
export class Keyring {
  private current: Credentials;

  /** Throws a ConfigError when the credentials cannot be loaded. */
  constructor(
    private readonly settings: Settings,
    private readonly log: Logger,
  ) {
    const { credentials, note } = loadCredentials(settings);
    this.current = credentials;
    log.info({ credentials: note }, describe(note));
  }

  credentials(): Credentials {
    return this.current;
  }

  /** Reads the files again (SIGHUP); on a problem the credentials in force stay, and it is logged. */
  reload(): boolean {
    try {
      const { credentials, note } = loadCredentials(this.settings);
      this.current = credentials;
      this.log.info({ credentials: note }, `credentials reloaded: ${describe(note)}`);
      return true;
    } catch (err) {
      this.log.error(`credentials not reloaded, the previous ones stay: ${(err as Error).message}`);
      return false;
    }
  }

  /** Signs requests to peers, and checks their answers, with the secret in force. */
  readonly sign = Object.assign(
    (method: string, url: string, to: string, body?: Uint8Array): Record<string, string> =>
      signedHeaders(this.current.secret, method, url, to, body),
    {
      answered: (requestSignature: string, body: Uint8Array, given: string | null) =>
        checkAnswer(this.current.secret, requestSignature, body, given),
    },
  );
}
