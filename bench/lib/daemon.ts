/**
 * What the benchmarks of bench/faults.ts, bench/load.ts and bench/soak.ts share: a real daemon
 * child process on the host backend with its own temp state and upload directories, the
 * checkpoints they push, the check of what the receivers assembled against the manifest,
 * helper processes, and a cleanup that leaves nothing behind (also when a run throws).
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type WrittenTensor, writeModel, writeSafetensors } from "../../test/checkpoint-files.ts";
import { daemonCommand } from "../../test/helpers.ts";
import { type Behaviour, ReferenceReceiver } from "../../test/reference-receiver.ts";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const PREFIX = "ckptd-bench-";
const TOKEN = "bench-admin-token-0123456789abcdef";
export const AUTH = { authorization: `Bearer ${TOKEN}` };

/** Temp directories, tmpfs mounts and child processes of one run; `cleanup` removes them all. */
export class Scratch {
  private readonly dirs: string[] = [];
  private readonly mounts: string[] = [];
  readonly procs = new Set<ChildProcess>();

  constructor() {
    // Whatever ends the run (an exception, Ctrl-C), nothing stays behind.
    process.once("exit", () => this.cleanup());
    for (const sig of ["SIGINT", "SIGTERM"] as const) {
      process.once(sig, () => {
        this.cleanup();
        process.exit(130);
      });
    }
  }

  /** A fresh directory under `parent` (the temp directory, or /dev/shm). */
  dir(parent: string = tmpdir()): string {
    const d = mkdtempSync(join(parent, PREFIX));
    this.dirs.push(d);
    return d;
  }

  /** A tmpfs of `size` (e.g. "8m") mounted on a fresh directory, owner-only; unmounted by cleanup. */
  tmpfs(size: string): string {
    const d = join(this.dir(), "tmpfs");
    execFileSync("mkdir", [d]);
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", d]);
    this.mounts.push(d);
    return d;
  }

  /** A helper script under Node with tsx (`args[0]` relative to the repository), its stdout piped. */
  spawn(args: string[]): ChildProcess {
    const proc = spawn(process.execPath, ["--import", "tsx", ...args], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "inherit"],
    });
    this.procs.add(proc);
    proc.on("exit", () => this.procs.delete(proc));
    return proc;
  }

  /** Kills every child still running, unmounts, removes the directories; synchronous, idempotent. */
  cleanup(): void {
    for (const p of this.procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
    for (const m of this.mounts.splice(0)) {
      try {
        execFileSync("umount", [m]);
      } catch (err) {
        process.stderr.write(`umount ${m}: ${(err as Error).message}\n`);
      }
    }
    for (const d of this.dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  }
}

/** Entries that this run's prefix left in /dev/shm and the temp directory (should be none after cleanup). */
export function leftovers(): string[] {
  const found: string[] = [];
  for (const parent of ["/dev/shm", tmpdir()]) {
    for (const e of readdirSync(parent)) if (e.startsWith(PREFIX)) found.push(join(parent, e));
  }
  return found;
}

export interface DaemonOptions {
  hostDevices?: number;
  bucketBytes?: number;
  bucketSlots?: number;
  receiverTimeoutMs?: number;
  /** Default: a fresh directory in /dev/shm. */
  uploadDir?: string;
  /** Added to the upload directory and the scratch directories. */
  registerRoots?: string[];
  logLevel?: string;
  /** Added to the daemon's environment (e.g. NODE_OPTIONS for a diagnosis). */
  env?: Record<string, string>;
  /** More flags (peers, UCX settings). */
  args?: string[];
}

/** A daemon child process (`node --import tsx daemon/main.ts --backend host`). */
export class DaemonProcess {
  private constructor(
    readonly scratch: Scratch,
    readonly proc: ChildProcess,
    readonly url: string,
    readonly stateDir: string,
    readonly uploadDir: string,
    readonly args: string[],
    readonly exited: Promise<number | string | null>,
    /** The last log lines (bounded: a soak run logs every update). */
    readonly logs: string[],
    private readonly env: Record<string, string>,
  ) {}

  get pid(): number {
    return this.proc.pid as number;
  }

  get socketDir(): string {
    return join(this.stateDir, "sockets");
  }

  socket(gpu: number): string {
    return join(this.socketDir, `gpu-${gpu}.sock`);
  }

  /** Starts a daemon on a free port and resolves once it logs "listening". */
  static async start(scratch: Scratch, opts: DaemonOptions = {}): Promise<DaemonProcess> {
    const home = scratch.dir();
    const stateDir = join(home, "state");
    const tokensFile = join(home, "tokens");
    writeFileSync(tokensFile, `admin:${TOKEN}\n`, { mode: 0o600 });
    writeFileSync(join(home, "secret"), "bench-cluster-secret-0123456789abcdef\n", { mode: 0o600 });
    const uploadDir = opts.uploadDir ?? join(scratch.dir("/dev/shm"), "uploads");
    const roots = ["/dev/shm", tmpdir(), ...(opts.registerRoots ?? [])];
    const args = [
      ...["--backend", "host", "--port", "0", "--state-dir", stateDir, "--upload-dir", uploadDir],
      ...["--register-roots", roots.join(","), "--tokens-file", tokensFile],
      ...["--cluster-secret-file", join(home, "secret"), "--host-devices", String(opts.hostDevices ?? 2)],
      ...["--bucket-bytes", String(opts.bucketBytes ?? 1 << 20), "--bucket-slots", String(opts.bucketSlots ?? 2)],
      ...["--receiver-timeout-ms", String(opts.receiverTimeoutMs ?? 2000), "--io-threads", "2"],
      ...["--log-level", opts.logLevel ?? "info"],
      ...(opts.args ?? []),
    ];
    return DaemonProcess.spawn(scratch, stateDir, uploadDir, args, opts.env);
  }

  private static spawn(
    scratch: Scratch,
    stateDir: string,
    uploadDir: string,
    args: string[],
    env: Record<string, string> = {},
  ): Promise<DaemonProcess> {
    const [cmd, base] = daemonCommand("node");
    const proc = spawn(cmd, [...base, ...args], {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    scratch.procs.add(proc);
    const exited = new Promise<number | string | null>((resolve) =>
      proc.on("exit", (code, signal) => {
        scratch.procs.delete(proc);
        resolve(code ?? signal);
      }),
    );
    const logs: string[] = [];
    const keep = (line: string) => {
      logs.push(line);
      if (logs.length > 400) logs.splice(0, 200);
    };
    return new Promise((resolve, reject) => {
      let buffered = "";
      proc.stdout?.on("data", (chunk: Buffer) => {
        buffered += chunk.toString();
        const lines = buffered.split("\n");
        buffered = lines.pop() ?? "";
        for (const line of lines) {
          keep(line);
          if (!line.includes('"listening"')) continue;
          const url = `http://127.0.0.1:${JSON.parse(line).port}`;
          resolve(new DaemonProcess(scratch, proc, url, stateDir, uploadDir, args, exited, logs, env));
        }
      });
      proc.stderr?.on("data", (chunk: Buffer) => keep(chunk.toString()));
      exited.then((code) => reject(new Error(`daemon exited (${code}) before listening:\n${logs.join("\n")}`)));
      setTimeout(() => reject(new Error(`daemon did not listen in 30 s:\n${logs.join("\n")}`)), 30_000).unref();
    });
  }

  /** The same daemon again (state, upload and socket directories), after this one exited. */
  restart(): Promise<DaemonProcess> {
    return DaemonProcess.spawn(this.scratch, this.stateDir, this.uploadDir, this.args, this.env);
  }

  /** SIGKILL, resolved once the process is gone. */
  async kill(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    this.proc.kill(signal);
    await this.exited;
  }

  /** JSON call with the admin token; a body that is not JSON comes back as `{text}`. */
  async api(method: string, path: string, body?: unknown): Promise<{ status: number; body: Json }> {
    const res = await fetch(this.url + path, {
      method,
      headers: body === undefined ? AUTH : { ...AUTH, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    try {
      return { status: res.status, body: JSON.parse(text) };
    } catch {
      return { status: res.status, body: { text } };
    }
  }

  /** VmRSS of the daemon process, in KiB. */
  async rssKiB(): Promise<number> {
    return (await this.memory()).VmRSS;
  }

  /** VmRSS and its parts (RssAnon, RssFile, RssShmem) from /proc/<pid>/status, in KiB. */
  async memory(): Promise<Record<"VmRSS" | "RssAnon" | "RssFile" | "RssShmem", number>> {
    const status = await readFile(`/proc/${this.pid}/status`, "utf8");
    const field = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1]);
    return {
      VmRSS: field("VmRSS"),
      RssAnon: field("RssAnon"),
      RssFile: field("RssFile"),
      RssShmem: field("RssShmem"),
    };
  }
}

// biome-ignore lint/suspicious/noExplicitAny: JSON answers, checked field by field where used
export type Json = any;

/** A small model-like checkpoint in a fresh /dev/shm directory; with `big`, one tensor spans several 1 MiB buckets. */
export function writeCheckpoint(scratch: Scratch, hidden = 64, big = false): { dir: string; tensors: WrittenTensor[] } {
  const dir = scratch.dir("/dev/shm");
  const tensors = writeModel(dir, 2, 3, hidden);
  if (big)
    tensors.push(
      ...writeSafetensors(join(dir, "big.safetensors"), [{ name: "big", dtype: "F32", shape: [1400, 1024] }]),
    );
  return { dir, tensors };
}

/** Tensor name -> {hash, bytes}, from GET /v1/checkpoints/{ref}. */
export type Manifest = Map<string, { hash: string; bytes: number }>;

export async function manifestOf(d: DaemonProcess, ref: string): Promise<Manifest> {
  const res = await d.api("GET", `/v1/checkpoints/${ref}`);
  if (res.status !== 200) throw new Error(`GET /v1/checkpoints/${ref}: ${res.status} ${JSON.stringify(res.body)}`);
  return new Map(
    (res.body.tensors as { name: string; hash: string; bytes: number }[]).map((t) => [
      t.name,
      { hash: t.hash, bytes: t.bytes },
    ]),
  );
}

/**
 * Bytes of the manifest's tensors whose assembled hash differs from the manifest's, or that
 * did not arrive (every byte of a mismatching tensor counts: a hash cannot say which differ).
 */
export function bytesDiffering(manifest: Manifest, got: Map<string, string> | undefined): number {
  let bytes = 0;
  for (const [name, t] of manifest) if (got?.get(name) !== t.hash) bytes += t.bytes;
  return bytes;
}

/** In-process reference receivers on GPUs 0..n-1, connected. */
export async function receivers(d: DaemonProcess, n: number, behaviour: Behaviour = {}): Promise<ReferenceReceiver[]> {
  const rs: ReferenceReceiver[] = [];
  for (let g = 0; g < n; g++) {
    const r = new ReferenceReceiver(d.socket(g), `engine-${g}`, { ...behaviour });
    await r.connect();
    rs.push(r);
  }
  return rs;
}

/**
 * Pushes `ref` and checks every receiver's assembled tensors against the manifest; returns
 * the answer, the time and the bytes differing summed over the receivers.
 */
export async function pushAndCheck(
  d: DaemonProcess,
  ref: string,
  rs: ReferenceReceiver[],
  manifest: Manifest,
): Promise<{ ok: boolean; ms: number; differing: number; status: number; body: Json }> {
  const t0 = performance.now();
  const res = await d.api("POST", "/v1/updates", { checkpoint: ref });
  const ms = performance.now() - t0;
  const id = res.body?.id as string | undefined;
  let differing = 0;
  for (const r of rs) {
    differing += bytesDiffering(manifest, id ? r.hashes.get(id) : undefined);
    if (id) r.hashes.delete(id);
  }
  const ok = res.status === 200 && res.body.state === "succeeded" && differing === 0;
  return { ok, ms, differing, status: res.status, body: res.body };
}

/** CPU time (user + system) a process has used so far, in ms, from /proc/<pid>/stat. */
export async function cpuMs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8");
  // Fields after the command name (which may hold spaces) in parentheses; utime and stime are 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100; // USER_HZ is 100 on Linux
}

/** Sorted-sample percentile (nearest rank). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] as number;
}

/** A plain text table, columns padded to their widest cell. */
export function table(head: string[], rows: (string | number)[][]): string {
  const cells = [head, ...rows.map((r) => r.map(String))];
  const widths = head.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? "").length)));
  const line = (r: string[]) =>
    r
      .map((c, i) => c.padEnd(widths[i] as number))
      .join("  ")
      .trimEnd();
  return [line(head), line(widths.map((w) => "-".repeat(w))), ...cells.slice(1).map(line)].join("\n");
}

/** The promise's value, or undefined once `ms` passed (the promise is left to settle). */
export async function within<T>(ms: number, promise: Promise<T>): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Lines of JSON a helper process writes to its stdout, one callback per line. */
export function onJsonLines(proc: ChildProcess, fn: (msg: Json) => void): void {
  let buffered = "";
  proc.stdout?.on("data", (chunk: Buffer) => {
    buffered += chunk.toString();
    const lines = buffered.split("\n");
    buffered = lines.pop() ?? "";
    for (const line of lines) if (line.trim()) fn(JSON.parse(line));
  });
}

/** Resolves with the first JSON line the helper writes that passes `pred`; rejects if it exits first. */
export function nextLine(proc: ChildProcess, pred: (msg: Json) => boolean = () => true): Promise<Json> {
  return new Promise((resolve, reject) => {
    onJsonLines(proc, (m) => {
      if (pred(m)) resolve(m);
    });
    // "close", not "exit": the line may still be in the pipe when the process has exited.
    proc.on("close", (code, sig) => reject(new Error(`helper exited (${code ?? sig}) before the expected line`)));
  });
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A numeric `--name value` of this script's command line, or `fallback`. */
export function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
}
