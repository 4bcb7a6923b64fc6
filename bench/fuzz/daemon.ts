/**
 * The daemon under test: a child `node` process on the host backend with its own temp
 * directory (state, uploads, register root), its credentials, an HTTP client to it, and the
 * health checks the fuzzer runs between inputs.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { Agent, request } from "node:http";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** JSON and CBOR bodies above this get a 413: small, so the limit is cheap to cross. */
export const MAX_BODY_BYTES = 1 << 20;
/** How long a request over the limit waits for its refusal before it sends its body. */
const EARLY_ANSWER_MS = 1000;
/** A request not answered within this is a hang. */
const ANSWER_MS = 10_000;

export interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
  ms: number;
}

export interface Call {
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: Uint8Array;
}

export class ChildDaemon {
  readonly dir = mkdtempSync(join(tmpdir(), "ckptd-fuzz-"));
  readonly stateDir = join(this.dir, "state");
  readonly uploadDir = join(this.dir, "uploads");
  /** The one directory registrations may name, besides the upload directory. */
  readonly roots = join(this.dir, "roots");
  readonly adminToken = `admin-${randomBytes(16).toString("hex")}`;
  readonly readToken = `read-${randomBytes(16).toString("hex")}`;
  secret = Buffer.alloc(0);
  /** Its node id: what peer requests are signed for. */
  nodeId = "";
  port = 0;
  /** The daemon's last log lines, for a crash report; lines at level error and above are counted. */
  readonly logs: string[] = [];
  errorLogs = 0;
  exitCode: number | null | undefined;
  private proc?: ChildProcess;
  private readonly agent = new Agent({ keepAlive: true, maxSockets: 16 });

  get pid(): number {
    return this.proc?.pid ?? 0;
  }

  get alive(): boolean {
    return this.proc !== undefined && this.exitCode === undefined;
  }

  socketPath(gpu: number): string {
    return join(this.stateDir, "sockets", `gpu-${gpu}.sock`);
  }

  /** Starts the daemon (its tokens file made first, with an admin and a read token) and waits for it to listen. */
  async start(): Promise<void> {
    mkdirSync(this.stateDir, { mode: 0o700 });
    mkdirSync(this.roots);
    writeFileSync(join(this.stateDir, "tokens"), `admin:${this.adminToken}\nread:${this.readToken}\n`, {
      mode: 0o600,
    });
    await this.spawn();
  }

  /** Starts the daemon again on the same directories, after it died (or is killed here). */
  async restart(): Promise<void> {
    const proc = this.proc;
    if (proc && this.alive) {
      const gone = new Promise((resolve) => proc.once("exit", resolve));
      proc.kill("SIGKILL");
      await gone;
    }
    this.exitCode = undefined;
    this.logs.length = 0;
    await this.spawn();
  }

  private async spawn(): Promise<void> {
    const args = [
      ...["--import", "tsx", join(ROOT, "daemon/main.ts"), "--backend", "host", "--port", "0"],
      ...["--state-dir", this.stateDir, "--upload-dir", this.uploadDir, "--register-roots", this.roots],
      ...["--host-devices", "2", "--log-level", "info", "--receiver-timeout-ms", "1000", "--io-threads", "1"],
      ...["--bucket-bytes", "1048576", "--bucket-memory-bytes", "4194304", "--pinned-budget-bytes", "268435456"],
      ...["--max-body-bytes", String(MAX_BODY_BYTES), "--shutdown-timeout-ms", "3000"],
    ];
    // At info: the port is in the "listening" line.
    const proc = spawn(process.execPath, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    proc.on("exit", (code, signal) => {
      this.exitCode = code ?? (signal ? -1 : null);
      this.note(`[exited with ${code ?? signal}]`);
    });
    proc.stderr?.on("data", (c: Buffer) => this.note(c.toString()));
    await new Promise<void>((resolve, reject) => {
      let buffered = "";
      proc.stdout?.on("data", (c: Buffer) => {
        buffered += c.toString();
        const lines = buffered.split("\n");
        buffered = lines.pop() ?? "";
        for (const line of lines) this.onLog(line, resolve);
      });
      proc.on("exit", () => reject(new Error(`daemon exited before listening:\n${this.logs.join("\n")}`)));
      setTimeout(() => reject(new Error("daemon did not listen within 30 s")), 30_000).unref();
    });
    this.secret = Buffer.from(readFileSync(join(this.stateDir, "cluster-secret"), "utf8").trim(), "utf8");
    this.nodeId = readFileSync(join(this.stateDir, "node-id"), "utf8").trim();
  }

  private onLog(line: string, listening: () => void): void {
    this.note(line);
    try {
      const entry = JSON.parse(line) as { level?: number; msg?: string; port?: number };
      if (entry.msg === "listening" && entry.port) {
        this.port = entry.port;
        listening();
      }
      if ((entry.level ?? 0) >= 50) this.errorLogs++;
    } catch {
      // not a JSON line: kept as it is
    }
  }

  private note(line: string): void {
    this.logs.push(line.slice(0, 2000));
    if (this.logs.length > 200) this.logs.shift();
  }

  /**
   * One HTTP request; rejects when the connection drops before an answer or none comes within
   * 10 s. A kept-alive connection that the daemon closed as idle just as it was reused is no
   * drop: the request is sent again on a fresh one (the retry Node's documentation advises).
   */
  async call(c: Call, timeoutMs = ANSWER_MS): Promise<Answer> {
    if ((c.body?.byteLength ?? 0) > MAX_BODY_BYTES) return this.raw(c, timeoutMs);
    try {
      return await this.attempt(c, timeoutMs, this.agent);
    } catch (err) {
      if (!(err as { reused?: boolean }).reused) throw err;
      return await this.attempt(c, timeoutMs, false);
    }
  }

  private attempt(
    { method, path, headers = {}, body }: Call,
    timeoutMs: number,
    agent: Agent | false,
  ): Promise<Answer> {
    const t0 = performance.now();
    return new Promise((resolve, reject) => {
      let answered = false;
      // Framed by its length always: Node sends a DELETE's body unframed otherwise.
      const framed = body === undefined ? headers : { ...headers, "content-length": String(body.byteLength) };
      const req = request(
        { host: "127.0.0.1", port: this.port, method, path, headers: framed, agent, timeout: timeoutMs },
        (res) => {
          answered = true;
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () =>
            resolve({
              status: res.statusCode ?? 0,
              headers: res.headers,
              body: Buffer.concat(chunks),
              ms: performance.now() - t0,
            }),
          );
          res.on("error", (err) => reject(new Error(`the answer was cut off: ${err.message}`)));
        },
      );
      req.on("timeout", () => {
        req.destroy(new Error(`no answer within ${timeoutMs} ms`));
      });
      // The daemon may answer (413) and close before it read a large body: that is an answer.
      req.on("error", (err: NodeJS.ErrnoException) => {
        if (answered) return;
        const closedIdle = req.reusedSocket && (err.code === "ECONNRESET" || err.message === "socket hang up");
        reject(Object.assign(err, { reused: closedIdle }));
      });
      req.end(body === undefined ? undefined : Buffer.from(body.buffer, body.byteOffset, body.byteLength));
    });
  }

  /**
   * A request whose body is over the limit, over a socket of its own, as a careful client
   * sends one: the head first, then the body only if no answer came within 1 s. The daemon
   * refuses such a body from its Content-Length before reading it; a client that pushed the
   * whole body at once would often lose that answer to the reset of the daemon's close.
   */
  private raw({ method, path, headers = {}, body = new Uint8Array() }: Call, timeoutMs: number): Promise<Answer> {
    const t0 = performance.now();
    const head = Object.entries({
      ...headers,
      host: "127.0.0.1",
      connection: "close",
      "content-length": body.byteLength,
    })
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join("");
    return new Promise((resolve, reject) => {
      const sock = createConnection(this.port, "127.0.0.1");
      const chunks: Buffer[] = [];
      const timer = setTimeout(() => sock.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      sock.on("data", (c: Buffer) => chunks.push(c));
      sock.on("error", () => undefined); // EPIPE once the daemon closed: what it answered is read on close
      sock.on("close", () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks);
        const end = text.indexOf("\r\n\r\n");
        const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text.subarray(0, 20).toString())?.[1] ?? 0);
        if (end < 0 || !status)
          return reject(new Error(`the connection closed without an answer (${text.length} bytes read)`));
        const lines = text.subarray(0, end).toString().split("\r\n").slice(1);
        const answerHeaders = Object.fromEntries(
          lines.map((l) => [l.slice(0, l.indexOf(":")).toLowerCase(), l.slice(l.indexOf(":") + 1).trim()]),
        );
        resolve({ status, headers: answerHeaders, body: text.subarray(end + 4), ms: performance.now() - t0 });
      });
      sock.write(`${method} ${path} HTTP/1.1\r\n${head}\r\n`);
      const early = setTimeout(() => sock.end(body), EARLY_ANSWER_MS);
      sock.once("data", () => {
        clearTimeout(early);
        sock.end();
      });
    });
  }

  /** /v1/healthz answers slower than 1 s that came within 1 s when asked again. */
  slowHealth = 0;

  /**
   * Why the daemon is not healthy, or undefined: dead, or /v1/healthz not answered within 1 s
   * twice in a row. One slow answer is counted (slowHealth), not reported: this machine's
   * cores are shared, and a hang does not answer the second time either.
   */
  async unhealthy(): Promise<string | undefined> {
    if (!this.alive) return `the daemon exited (${this.exitCode})`;
    let why: string | undefined;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const a = await this.call({ method: "GET", path: "/v1/healthz" }, 1000);
        if (a.status !== 200) return `GET /v1/healthz answered ${a.status}`;
        if (attempt > 0) this.slowHealth++;
        return undefined;
      } catch (err) {
        why = `GET /v1/healthz, twice: ${(err as Error).message}`;
        if (!this.alive) return `the daemon exited (${this.exitCode})`;
      }
    }
    return why;
  }

  /** The daemon's resident set, in bytes (VmRSS of /proc/<pid>/status). */
  rss(): number {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${this.pid}/status`, "utf8"));
      return m ? Number(m[1]) * 1024 : 0;
    } catch {
      return 0;
    }
  }

  /** Stops the daemon (SIGTERM, then SIGKILL after 5 s) and removes its directory. */
  async stop(): Promise<void> {
    this.agent.destroy();
    const proc = this.proc;
    if (proc && this.alive) {
      const gone = new Promise((resolve) => proc.once("exit", resolve));
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await gone;
      clearTimeout(timer);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
