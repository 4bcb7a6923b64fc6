/**
 * HTTPS for the API: the certificate and key are read at start (the key must be private),
 * and a daemon that listens beyond loopback without them says so, since tokens then travel
 * in clear.
 */
import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import { readPrivate } from "../auth/credentials.ts";
import { ConfigError } from "../config/load.ts";
import type { Config } from "../config/schema.ts";

export interface Tls {
  cert: string;
  key: string;
}

/** The certificate and key configured, or undefined for plain HTTP; ConfigError naming the problem. */
export function loadTls({ tlsCertFile, tlsKeyFile }: Pick<Config, "tlsCertFile" | "tlsKeyFile">): Tls | undefined {
  if (!tlsCertFile && !tlsKeyFile) return undefined;
  if (!tlsCertFile || !tlsKeyFile) throw new ConfigError("tlsCertFile and tlsKeyFile are set together, or neither");
  let cert: string;
  try {
    cert = readFileSync(tlsCertFile, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read tlsCertFile ${tlsCertFile}: ${(err as Error).message}`);
  }
  if (!cert.includes("-----BEGIN CERTIFICATE-----")) {
    throw new ConfigError(`tlsCertFile ${tlsCertFile} holds no PEM certificate`);
  }
  const key = readPrivate(tlsKeyFile, "tlsKeyFile", 0o077, "a private key is readable by its owner only");
  if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(key))
    throw new ConfigError(`tlsKeyFile ${tlsKeyFile} holds no PEM private key`);
  return { cert, key };
}

/** Whether `host` only ever reaches this machine (127.0.0.0/8, ::1, localhost). */
export function isLoopback(host: string): boolean {
  if (host === "localhost" || host === "::1") return true;
  return isIP(host) === 4 && host.startsWith("127.");
}
