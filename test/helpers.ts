/** Starts real daemon processes for tests: under Node (tsx), Deno, or the built binary. */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { type IncomingMessage, request, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ANSWER_HEADER, answerSignature } from "../daemon/auth/signature.ts";

export const ROOT = fileURLToPath(new URL("..", import.meta.url));
export const DENO = existsSync(join(ROOT, "node_modules/deno/deno"))
  ? join(ROOT, "node_modules/deno/deno")
  : join(ROOT, "node_modules/.bin/deno");
/** FFI already grants everything, and Deno guards /dev/shm (where checkpoints live) behind --allow-all. */
export const DENO_FLAGS = ["run", "--allow-all"];

export type RuntimeName = "node" | "deno";

export function daemonCommand(runtime: RuntimeName): [string, string[]] {
  const main = join(ROOT, "daemon/main.ts");
  if (runtime === "deno") return [DENO, [...DENO_FLAGS, main]];
  return [process.execPath, ["--import", "tsx", main]];
}

export interface Running {
  proc: ChildProcess;
  port: number;
  url: string;
  logs: string[];
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
}

const made: string[] = [];

/** A fresh directory under `parent` (the system's temp directory, or /dev/shm), removed after the test file. */
export function tempDir(prefix = "ckptd-test-", parent: string = tmpdir()): string {
  // The run's tag (test/global-setup.ts) tells this run's directories from a neighbour's.
  const dir = mkdtempSync(join(parent, `${prefix}${process.env.TEST_RUN_TAG ?? "0"}-`));
  made.push(dir);
  return dir;
}

/** Removes every directory tempDir made so far (test/setup.ts runs it after each file). */
export function removeTempDirs(): void {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
}

/** The credentials of the test daemons: known tokens of both roles and one cluster secret. */
/** The first python that imports torch ($TORCH_PYTHON, python3 or /usr/bin/python3), or undefined. */
export function torchPython(): string | undefined {
  const candidates = process.env.TORCH_PYTHON ? [process.env.TORCH_PYTHON] : ["python3", "/usr/bin/python3"];
  return candidates.find((py) => spawnSync(py, ["-c", "import torch"], { stdio: "ignore" }).status === 0);
}

export const ADMIN_TOKEN = "test-admin-token-0123456789abcdef";
export const READ_TOKEN = "test-read-token-0123456789abcdef";
export const CLUSTER_SECRET = "test-cluster-secret-0123456789abcdef";
/** Headers of a request with the admin token (READ_AUTH: the read token). */
export const AUTH = { authorization: `Bearer ${ADMIN_TOKEN}` };
export const READ_AUTH = { authorization: `Bearer ${READ_TOKEN}` };

/** Writes the tokens file and the secret file (0600); the config keys that use them. */
export function testCredentials(): { tokensFile: string; clusterSecretFile: string } {
  const dir = tempDir();
  const tokensFile = join(dir, "tokens");
  const clusterSecretFile = join(dir, "cluster-secret");
  writeFileSync(tokensFile, `admin:${ADMIN_TOKEN}\nread:${READ_TOKEN}\n`, { mode: 0o600 });
  writeFileSync(clusterSecretFile, `${CLUSTER_SECRET}\n`, { mode: 0o600 });
  return { tokensFile, clusterSecretFile };
}

/**
 * Spawns a daemon on a free port and resolves once it logs "listening". It runs with
 * testCredentials() unless `credentials` is false (then it makes its own in its state dir).
 */
export function startProcess(
  command: [string, string[]],
  args: string[] = [],
  env: Record<string, string> = {},
  { credentials = true, stateDir = tempDir() }: { credentials?: boolean; stateDir?: string } = {},
): Promise<Running> {
  const [cmd, baseArgs] = command;
  const auth = credentials ? testCredentials() : undefined;
  const authArgs = auth ? ["--tokens-file", auth.tokensFile, "--cluster-secret-file", auth.clusterSecretFile] : [];
  // Test files live in temp dirs; the upload directory is one too, so the test removes it.
  const fileArgs = ["--upload-dir", tempDir("ckptd-test-", "/dev/shm"), "--register-roots", `/dev/shm,${tmpdir()}`];
  const proc = spawn(cmd, [...baseArgs, "--port", "0", "--state-dir", stateDir, ...fileArgs, ...authArgs, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs: string[] = [];
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  return new Promise((resolve, reject) => {
    let buffered = "";
    const onData = (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split("\n");
      buffered = lines.pop() ?? "";
      for (const line of lines) {
        logs.push(line);
        const listening = line.includes('"listening"') ? JSON.parse(line) : undefined;
        if (listening?.port) {
          const { port, scheme } = listening;
          resolve({ proc, port, url: `${scheme ?? "http"}://127.0.0.1:${port}`, logs, exited });
        }
      }
    };
    proc.stdout?.on("data", onData);
    proc.stderr?.on("data", (chunk: Buffer) => logs.push(chunk.toString()));
    exited.then((code) => reject(new Error(`daemon exited with ${code} before listening:\n${logs.join("\n")}`)));
    setTimeout(() => reject(new Error(`daemon did not listen in 20 s:\n${logs.join("\n")}`)), 20_000).unref();
  });
}

/** Runs a command to completion, collecting its output. */
export function run(
  command: [string, string[]],
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const [cmd, baseArgs] = command;
  const proc = spawn(cmd, [...baseArgs, ...args], { cwd: ROOT, env: { ...process.env, ...env } });
  let stdout = "";
  let stderr = "";
  proc.stdout.on("data", (c) => {
    stdout += c;
  });
  proc.stderr.on("data", (c) => {
    stderr += c;
  });
  return new Promise((resolve) => proc.on("exit", (code) => resolve({ code, stdout, stderr })));
}

/** The error `run` throws (fails the test if it throws none), to assert its exact message and code. */
export function thrown(run: () => unknown): Error & { code?: string; details?: unknown } {
  try {
    run();
  } catch (err) {
    return err as Error;
  }
  throw new Error("expected an error, but none was thrown");
}

/** The promise's value, or a rejection saying it did not settle within `ms` (a bound a test asserts). */
export async function within<T>(ms: number, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`did not settle within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Sends a request as a client that keeps writing while the answer comes (as curl does): resolves
 * with the answer, however much of `body` the daemon read (chunked without a Content-Length).
 */
export function early(port: number, method: string, path: string, headers: Record<string, string>, body: Uint8Array[]) {
  // biome-ignore lint/suspicious/noExplicitAny: test responses are checked field by field
  return new Promise<{ status: number; body: any }>((resolve, reject) => {
    // A connection of its own: one the daemon hangs up on must not be reused.
    const req = request(`http://127.0.0.1:${port}${path}`, { method, headers: { ...AUTH, ...headers }, agent: false });
    req.on("response", (res) => {
      let text = "";
      res.on("data", (c) => {
        text += c;
      });
      res.on("end", () => {
        resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) });
        req.destroy();
      });
    });
    req.on("error", (err) => (req.destroyed ? undefined : reject(err)));
    req.flushHeaders();
    for (const chunk of body) req.write(chunk);
    if (body.length > 0) req.end(); // with none, only the declared length is sent
  });
}

/**
 * Ends a fake peer's answer signed with the tests' cluster secret, as a daemon of the cluster
 * signs its answers (auth/signature.ts answerSignature): a fake that holds the secret but misbehaves.
 */
export function endSigned(req: IncomingMessage, res: ServerResponse, text: string): void {
  const given = String(req.headers["x-ckptd-signature"] ?? "");
  res.setHeader(ANSWER_HEADER, answerSignature(Buffer.from(CLUSTER_SECRET), given, new TextEncoder().encode(text)));
  res.end(text);
}
