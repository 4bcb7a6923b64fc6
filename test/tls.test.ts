/**
 * HTTPS for the API (tlsCertFile, tlsKeyFile) under Node and Deno, peers reached over it,
 * the key's permissions, and the warning of a daemon in clear beyond loopback.
 */
import { execFileSync } from "node:child_process";
import { chmodSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:https";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import type { Config } from "../daemon/config/index.ts";
import { type Daemon, startDaemon } from "../daemon/daemon.ts";
import { validityWarning } from "../daemon/http/tls.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { ckptHash, writeModel } from "./checkpoint-files.ts";
import { AUTH, daemonCommand, startProcess, tempDir } from "./helpers.ts";
import { LIB_DIR, testConfig } from "./in-process.ts";
import { ReferenceReceiver } from "./reference-receiver.ts";

/** A self-signed certificate for 127.0.0.1, its key 0600. */
function certificate(): { certFile: string; keyFile: string; cert: string } {
  const dir = tempDir();
  const certFile = join(dir, "cert.pem");
  const keyFile = join(dir, "key.pem");
  execFileSync(
    "openssl",
    ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
      .concat(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
      // Deno's TLS refuses a CA certificate used as a server's (openssl's default is CA:TRUE).
      .concat(["-addext", "basicConstraints=critical,CA:FALSE"])
      .concat(["-keyout", keyFile, "-out", certFile]),
    { stdio: "ignore" },
  );
  chmodSync(keyFile, 0o600);
  return { certFile, keyFile, cert: readFileSync(certFile, "utf8") };
}

/** GET over HTTPS trusting `ca` only. */
function get(url: string, ca: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ca, headers: AUTH }, (res) => {
      let body = "";
      res.on("data", (c) => {
        body += c;
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

const running: Daemon[] = [];
afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
});

async function start(extra: Partial<Config>) {
  const config = testConfig(extra);
  const logs: { level: number; msg: string; scheme?: string }[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => logs.push(JSON.parse(line)) });
  const daemon = await startDaemon({ config, runtime: nodeRuntime, log, nodeId: "t", libDir: LIB_DIR });
  running.push(daemon);
  return { daemon, logs };
}

const clearWarning = (logs: { msg: string }[]) => logs.filter((l) => l.msg.includes("travel in clear"));

describe("TLS", () => {
  it("serves the API over HTTPS under Node, and not in clear", async () => {
    const { certFile, keyFile, cert } = certificate();
    const { daemon, logs } = await start({ tlsCertFile: certFile, tlsKeyFile: keyFile, host: "0.0.0.0" });
    const res = await get(`https://127.0.0.1:${daemon.port}/v1/status`, cert);
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body).nodeId).toBe("t");
    await expect(fetch(`http://127.0.0.1:${daemon.port}/v1/healthz`)).rejects.toThrow();
    expect(logs.find((l) => l.msg === "listening")?.scheme).toBe("https");
    expect(clearWarning(logs)).toEqual([]);
  });

  it("serves the API over HTTPS under Deno", async () => {
    const { certFile, keyFile, cert } = certificate();
    const d = await startProcess(daemonCommand("deno"), ["--tls-cert-file", certFile, "--tls-key-file", keyFile]);
    try {
      expect(d.url).toMatch(/^https:/);
      expect((await get(`${d.url}/v1/healthz`, cert)).status).toBe(200);
    } finally {
      d.proc.kill("SIGTERM");
      expect(await d.exited).toBe(0);
    }
  });

  it.each([
    { runtime: "node" as const, trust: "NODE_EXTRA_CA_CERTS" },
    { runtime: "deno" as const, trust: "DENO_CERT" },
  ])(
    "pushes an update to a peer whose API is HTTPS under $runtime, trusted through $trust",
    async ({ runtime, trust }) => {
      const { certFile, keyFile } = certificate();
      const dir = tempDir("ckptd-test-", "/dev/shm");
      const tensors = writeModel(dir, 1, 2, 256);
      const sockets = [tempDir(), tempDir()];
      const tls = ["--tls-cert-file", certFile, "--tls-key-file", keyFile];
      const peer = await startProcess(daemonCommand(runtime), ["--socket-dir", sockets[1] as string, ...tls]);
      const daemon = await startProcess(
        daemonCommand(runtime),
        ["--socket-dir", sockets[0] as string, "--peers", peer.url, ...tls],
        { [trust]: certFile },
      );
      const receivers = [
        new ReferenceReceiver(`${sockets[0]}/gpu-0.sock`, "a"),
        new ReferenceReceiver(`${sockets[1]}/gpu-0.sock`, "b"),
      ];
      try {
        for (const r of receivers) await r.connect();
        const post = (url: string, path: string, body: unknown) => postJson(url, path, body, certFile);
        expect((await post(daemon.url, "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
        expect((await post(peer.url, "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
        const res = await post(daemon.url, "/v1/updates", { checkpoint: "m" });
        expect(JSON.parse(res.body)).toMatchObject({ state: "succeeded" });
        for (const r of receivers) {
          const got = [...r.hashes.values()][0];
          for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
        }
      } finally {
        for (const r of receivers) await r.close();
        for (const d of [daemon, peer]) {
          d.proc.kill("SIGTERM");
          expect(await d.exited).toBe(0);
        }
        rmSync(dir, { recursive: true });
      }
    },
  );

  it("refuses a key readable by others, half a pair, and files that are not PEM, naming them", async () => {
    const { certFile, keyFile } = certificate();
    chmodSync(keyFile, 0o640);
    await expect(start({ tlsCertFile: certFile, tlsKeyFile: keyFile })).rejects.toThrow(
      `tlsKeyFile ${keyFile} has mode 0640: a private key is readable by its owner only (chmod 600 it)`,
    );
    chmodSync(keyFile, 0o600);
    await expect(start({ tlsCertFile: certFile })).rejects.toThrow(
      "tlsCertFile and tlsKeyFile are set together, or neither",
    );
    await expect(start({ tlsKeyFile: keyFile })).rejects.toThrow("tlsCertFile and tlsKeyFile are set together");
    await expect(start({ tlsCertFile: keyFile, tlsKeyFile: keyFile })).rejects.toThrow(
      `tlsCertFile ${keyFile} holds no PEM certificate`,
    );
    const notKey = join(tempDir(), "not-a-key.pem");
    writeFileSync(notKey, readFileSync(certFile), { mode: 0o600 });
    await expect(start({ tlsCertFile: certFile, tlsKeyFile: notKey })).rejects.toThrow(
      `tlsKeyFile ${notKey} holds no PEM private key`,
    );
    await expect(start({ tlsCertFile: "/nonexistent.pem", tlsKeyFile: keyFile })).rejects.toThrow(
      "cannot read tlsCertFile /nonexistent.pem",
    );
  });

  it("refuses, before anything is opened, a key of another certificate, an encrypted key and a broken certificate", async () => {
    const a = certificate();
    const b = certificate();
    await expect(start({ tlsCertFile: a.certFile, tlsKeyFile: b.keyFile })).rejects.toThrow(
      `tlsKeyFile ${b.keyFile} is not the key of the certificate in tlsCertFile ${a.certFile}`,
    );
    const encrypted = join(tempDir(), "encrypted.pem");
    execFileSync("openssl", ["pkcs8", "-topk8", "-in", a.keyFile, "-out", encrypted, "-passout", "pass:secret"]);
    chmodSync(encrypted, 0o600);
    await expect(start({ tlsCertFile: a.certFile, tlsKeyFile: encrypted })).rejects.toThrow(
      `tlsKeyFile ${encrypted} is encrypted: the daemon takes an unencrypted key (mode 0600)`,
    );
    const broken = join(tempDir(), "broken.pem");
    writeFileSync(broken, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    await expect(start({ tlsCertFile: broken, tlsKeyFile: a.keyFile })).rejects.toThrow(
      new RegExp(`^tlsCertFile ${broken} is not a valid certificate \\(`),
    );
    const combined = join(tempDir(), "combined.pem");
    writeFileSync(combined, readFileSync(a.certFile, "utf8") + readFileSync(a.keyFile, "utf8"), { mode: 0o644 });
    chmodSync(combined, 0o644);
    await expect(start({ tlsCertFile: combined, tlsKeyFile: a.keyFile })).rejects.toThrow(
      `tlsCertFile ${combined} holds a private key and is readable by others: keep the key in tlsKeyFile`,
    );
    const fifo = join(tempDir(), "fifo.pem");
    execFileSync("mkfifo", [fifo]);
    await expect(start({ tlsCertFile: fifo, tlsKeyFile: a.keyFile })).rejects.toThrow(
      `tlsCertFile ${fifo} is not a regular file`,
    );
  });

  it("warns about a certificate out of its dates", () => {
    const tls = {
      cert: "",
      key: "",
      validFrom: new Date("2026-01-01T00:00:00Z"),
      validTo: new Date("2026-06-01T00:00:00Z"),
    };
    expect(validityWarning(tls, new Date("2026-03-01T00:00:00Z"))).toBeUndefined();
    expect(validityWarning(tls, new Date("2026-07-01T00:00:00Z"))).toBe(
      "the TLS certificate expired at 2026-06-01T00:00:00.000Z: clients will refuse it",
    );
    expect(validityWarning(tls, new Date("2025-12-01T00:00:00Z"))).toBe(
      "the TLS certificate is valid only from 2026-01-01T00:00:00.000Z",
    );
  });

  it("warns at start that tokens travel in clear beyond loopback without TLS, and only then", async () => {
    const wide = await start({ host: "0.0.0.0" });
    expect(clearWarning(wide.logs)).toEqual([
      expect.objectContaining({
        level: 40,
        msg: "the API listens beyond loopback without TLS: tokens and requests travel in clear (set tlsCertFile and tlsKeyFile)",
      }),
    ]);
    for (const host of ["127.0.0.1", "127.0.0.2", "::1", "localhost"]) {
      const local = await start({ host });
      expect(clearWarning(local.logs)).toEqual([]);
    }
  });
});

/** POST JSON over HTTPS (trusting `caFile`) with the admin token. */
function postJson(base: string, path: string, body: unknown, caFile: string) {
  return new Promise<{ status: number; body: string }>((resolve, reject) => {
    const data = JSON.stringify(body);
    const headers = { ...AUTH, "content-type": "application/json", "content-length": Buffer.byteLength(data) };
    const req = request(`${base}${path}`, { method: "POST", headers, ca: readFileSync(caFile) }, (res) => {
      let text = "";
      res.on("data", (c) => {
        text += c;
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: text }));
    });
    req.on("error", reject);
    req.end(data);
  });
}
