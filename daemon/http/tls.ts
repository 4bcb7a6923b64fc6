/**
 * HTTPS for the API: the certificate and key are read at start (the key must be private),
 * and a daemon that listens beyond loopback without them says so, since tokens then travel
 * in clear.
 */
import { createPrivateKey, X509Certificate } from "node:crypto";
import { statSync } from "node:fs";
import { isIP } from "node:net";
import { readPrivate } from "../auth/credentials.ts";
import { ConfigError } from "../config/load.ts";
import type { Config } from "../config/schema.ts";

export interface Tls {
  cert: string;
  key: string;
  /** The certificate's validity, for the warning at start. */
  validFrom: Date;
  validTo: Date;
}

const refuse = (message: string): never => {
  throw new ConfigError(message);
};

/**
 * The certificate and key configured, or undefined for plain HTTP. Both are parsed and
 * checked to be a pair here, so a bad file stops the start with a ConfigError naming it
 * (exit 2), not a failure to listen; neither file's text appears in an error.
 */
export function loadTls({ tlsCertFile, tlsKeyFile }: Pick<Config, "tlsCertFile" | "tlsKeyFile">): Tls | undefined {
  if (!tlsCertFile && !tlsKeyFile) return undefined;
  if (!tlsCertFile || !tlsKeyFile) refuse("tlsCertFile and tlsKeyFile are set together, or neither");
  const cert = readPrivate(tlsCertFile, "tlsCertFile", 0, "");
  if (!cert.includes("-----BEGIN CERTIFICATE-----")) refuse(`tlsCertFile ${tlsCertFile} holds no PEM certificate`);
  if (/PRIVATE KEY-----/.test(cert) && statSync(tlsCertFile).mode & 0o044) {
    refuse(`tlsCertFile ${tlsCertFile} holds a private key and is readable by others: keep the key in tlsKeyFile`);
  }
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (err) {
    return refuse(`tlsCertFile ${tlsCertFile} is not a valid certificate (${(err as Error).message})`);
  }
  const key = readPrivate(tlsKeyFile, "tlsKeyFile", 0o077, "a private key is readable by its owner only");
  if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(key)) refuse(`tlsKeyFile ${tlsKeyFile} holds no PEM private key`);
  if (/ENCRYPTED/.test(key))
    refuse(`tlsKeyFile ${tlsKeyFile} is encrypted: the daemon takes an unencrypted key (mode 0600)`);
  let pair: boolean;
  try {
    pair = x509.checkPrivateKey(createPrivateKey(key));
  } catch (err) {
    return refuse(`tlsKeyFile ${tlsKeyFile} is not a valid private key (${(err as Error).message})`);
  }
  if (!pair) refuse(`tlsKeyFile ${tlsKeyFile} is not the key of the certificate in tlsCertFile ${tlsCertFile}`);
  return { cert, key, validFrom: new Date(x509.validFrom), validTo: new Date(x509.validTo) };
}

/** What to warn about the certificate's dates at `now`, if anything. */
export function validityWarning(tls: Tls, now: Date): string | undefined {
  if (now > tls.validTo) return `the TLS certificate expired at ${tls.validTo.toISOString()}: clients will refuse it`;
  if (now < tls.validFrom) return `the TLS certificate is valid only from ${tls.validFrom.toISOString()}`;
  return undefined;
}

/** Whether `host` only ever reaches this machine (127.0.0.0/8, ::1, localhost). */
export function isLoopback(host: string): boolean {
  if (host === "localhost" || host === "::1") return true;
  return isIP(host) === 4 && host.startsWith("127.");
}
