/**
 * The daemon's side of the receiver protocol (integrations/PROTOCOL.md): one Unix socket per
 * GPU, JSON lines, receivers that connect, say hello and then follow updates.
 */
import { chmodSync, chownSync, rmSync, symlinkSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { basename, join } from "node:path";
import type { Logger } from "pino";
import type { PeerCred } from "../../ffi/index.ts";
import { ConfigError } from "../config/index.ts";
import { preview } from "../errors.ts";
import { type EngineAccess, refusal } from "./engine-access.ts";

export const PROTOCOL = 1;
/** A protocol line longer than this (bytes of UTF-8, about) disconnects the receiver. */
export const MAX_LINE_BYTES = 1 << 20;
/** Invalid messages (not JSON, no op) a receiver may send before it is disconnected. */
export const MAX_INVALID = 3;
/** Messages no wait consumed (acks of nothing) a receiver may have queued. */
export const MAX_INBOX = 1000;

let connections = 0;

/** How long a receiver has, at shutdown, to take the daemon's last messages and hang up. */
const END_MS = 1000;

export type Message = { op: string; [key: string]: unknown };

/** What a receiver holds, as far as this daemon knows: a version's tensors, name -> skip.ts heldAs. */
export interface Holding {
  version: string;
  hashes: ReadonlyMap<string, string>;
}

/** One connected engine process on one GPU. */
export class Receiver {
  name = "unnamed";
  /**
   * Whether updates may leave out the tensors it holds already: only when its hello says
   * `partial: true` (an engine that vouches its weights stay as it applied them); otherwise
   * it gets every tensor of every update, as receivers of this protocol always did.
   */
  partial = false;
  /**
   * Whether updates may send it deltas of the tensors it holds (hello `deltas: true`, with
   * `partial`): it applies a delta's new values at their positions, in place.
   */
  deltas = false;
  /** GPU memory it can spend staging an atomic update (hello `stageBytes`; 0: it cannot stage). */
  stageBytes = 0;
  /**
   * The version it holds: set when it applied a whole update (answered `done`), cleared when an
   * update to it begins; a receiver that connects holds nothing known.
   */
  holds?: Holding;
  /** The connecting process, as the kernel saw it (SO_PEERCRED), not as it says in hello. */
  pid = 0;
  uid = 0;
  ready = false;
  closed = false;
  private buffered = "";
  private invalid = 0;
  private firstInvalid = "";
  /** Why the daemon cuts this receiver off, once it broke the protocol. */
  violation?: string;
  readonly connection = ++connections;
  private readonly waiters = new Set<(msg: Message | undefined) => void>();
  /** Messages not yet consumed by a waiter (acks arriving early, errors). */
  readonly inbox: Message[] = [];

  constructor(
    readonly gpu: number,
    readonly socket: Socket,
  ) {}

  get label(): string {
    if (!this.ready) return `connection #${this.connection} (pid ${this.pid}, GPU ${this.gpu}, no hello yet)`;
    return `${this.name} (pid ${this.pid}, GPU ${this.gpu})`;
  }

  send(msg: Message): void {
    if (!this.closed) this.socket.write(`${JSON.stringify(msg)}\n`);
  }

  /**
   * Feeds received text; returns the complete messages. Sets `violation` (and returns what came
   * before it) once a line exceeds MAX_LINE_BYTES or the MAX_INVALID-th invalid message arrives.
   */
  feed(chunk: string): Message[] {
    // Only the new chunk is searched: a long line without a newline costs its length once.
    if (!chunk.includes("\n")) {
      this.buffered += chunk;
      if (this.buffered.length > MAX_LINE_BYTES) this.violation = `sent a line of over ${MAX_LINE_BYTES} bytes`;
      return [];
    }
    const lines = (this.buffered + chunk).split("\n");
    this.buffered = lines.pop() ?? "";
    const out: Message[] = [];
    for (const line of [...lines, this.buffered]) {
      if (line.length > MAX_LINE_BYTES) {
        this.violation = `sent a line of over ${MAX_LINE_BYTES} bytes`;
        return out;
      }
    }
    for (const line of lines) {
      if (!line.trim()) continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        msg = undefined;
      }
      if (typeof (msg as Message | undefined)?.op === "string") {
        out.push(msg as Message);
        continue;
      }
      if (this.invalid++ === 0) this.firstInvalid = line.slice(0, 200);
      if (this.invalid >= MAX_INVALID) {
        this.violation = `sent ${this.invalid} invalid messages (not JSON with an "op"), the first: ${this.firstInvalid}`;
        return out;
      }
    }
    return out;
  }

  deliver(msg: Message): void {
    if (this.inbox.length >= MAX_INBOX) {
      this.violation = `sent over ${MAX_INBOX} messages nobody waited for`;
      return;
    }
    this.inbox.push(msg);
    for (const w of [...this.waiters]) w(msg);
  }

  /** Takes the acks of `update` that arrived but no wait consumed (a failure ended the waits first); returns how many. */
  takeAcks(update: string): number {
    const before = this.inbox.length;
    for (let i = this.inbox.length - 1; i >= 0; i--) {
      const m = this.inbox[i];
      if (m?.op === "ack" && m.update === update) this.inbox.splice(i, 1);
    }
    return before - this.inbox.length;
  }

  /** Drops what is left of an update's messages (late acks must not match a later update). */
  forget(update: string): void {
    for (let i = this.inbox.length - 1; i >= 0; i--) if (this.inbox[i]?.update === update) this.inbox.splice(i, 1);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    for (const w of [...this.waiters]) w(undefined);
  }

  /**
   * Closes once what was sent has gone out (at shutdown, the last `abort` must reach it),
   * within `ms`: a receiver that does not hang up in time is cut off.
   */
  async end(ms: number): Promise<void> {
    if (this.closed) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.socket.once("close", () => {
        clearTimeout(timer);
        resolve();
      });
      this.socket.end();
    });
    this.close();
  }

  /**
   * Resolves with the first inbox message matching `pred` (consuming it), or rejects when
   * the receiver disconnects, sends an error for this update, `timeoutMs` passes or `signal`
   * aborts (with its reason).
   */
  expect(
    pred: (m: Message) => boolean,
    update: string,
    timeoutMs: number,
    what: string,
    signal?: AbortSignal,
  ): Promise<Message> {
    return new Promise((resolve, reject) => {
      const scan = (): boolean => {
        // An error for the update fails every wait of it, so it stays in the inbox.
        const failed = this.inbox.find((m) => m.op === "error" && m.update === update);
        if (failed) {
          cleanup();
          const message = typeof failed.message === "string" ? failed.message : preview(failed.message);
          reject(new ReceiverError(this, `failed: ${message}`));
          return true;
        }
        const i = this.inbox.findIndex(pred);
        if (i < 0) return false;
        const [m] = this.inbox.splice(i, 1) as [Message];
        cleanup();
        resolve(m);
        return true;
      };
      const waiter = (m: Message | undefined) => {
        if (m === undefined) {
          cleanup();
          reject(new ReceiverError(this, `disconnected while the daemon waited for ${what}`));
        } else scan();
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new ReceiverError(this, `did not answer within ${timeoutMs} ms (waiting for ${what})`));
      }, timeoutMs);
      const aborted = () => {
        cleanup();
        reject(new Error(String(signal?.reason ?? "aborted")));
      };
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        signal?.removeEventListener("abort", aborted);
      };
      if (signal?.aborted) {
        aborted();
        return;
      }
      signal?.addEventListener("abort", aborted);
      if (this.closed) {
        cleanup();
        reject(new ReceiverError(this, `disconnected before ${what}`));
        return;
      }
      this.waiters.add(waiter);
      scan();
    });
  }
}

/** A receiver failed an update; the message names it. */
export class ReceiverError extends Error {
  constructor(
    readonly receiver: Receiver,
    reason: string,
  ) {
    super(`receiver ${receiver.label} ${reason}`);
    this.name = "ReceiverError";
  }
}

/** Whether something listens on the Unix socket at `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createConnection(path);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
}

/** Tells a connection why it is not taken (the protocol's `refused`) and hangs up. */
function refuse(socket: Socket, reason: string): void {
  socket.on("error", () => undefined); // it may be gone already
  socket.end(`${JSON.stringify({ op: "refused", reason })}\n`);
  socket.setTimeout(1000, () => socket.destroy());
}

/** The sockets of all GPUs and the receivers connected to them. */
export class ReceiverHub {
  /** The sockets this hub listens on, with their paths (only those are removed at close). */
  private readonly servers: { server: Server; path: string }[] = [];
  private readonly receivers = new Set<Receiver>();
  private readonly aliases: string[] = [];

  constructor(
    readonly socketDir: string,
    private readonly gpus: number,
    private readonly log: Logger,
    /** Messages a new receiver gets after hello (welcome, buffers). */
    private readonly greet: (r: Receiver) => void,
    /** Who may connect, and how to learn who did. */
    private readonly access: EngineAccess & { peerCred(fd: number): PeerCred },
  ) {}

  socketPath(gpu: number): string {
    return join(this.socketDir, `gpu-${gpu}.sock`);
  }

  /**
   * `<socketDir>/<uuid>.sock`, the name by which engines whose CUDA_VISIBLE_DEVICES lists GPU
   * UUIDs find a GPU's socket: a symbolic link to `gpu-<index>.sock`.
   */
  aliasPath(uuid: string): string {
    return join(this.socketDir, `${uuid}.sock`);
  }

  /**
   * Listens on every GPU's socket in socketDir (made before, see config/own-dir.ts); `uuids`
   * (by GPU index) get their alias links, where the path fits a Unix socket address.
   */
  async listen(uuids: string[] = []): Promise<void> {
    const gid = this.access.group?.gid;
    for (let gpu = 0; gpu < this.gpus; gpu++) {
      const path = this.socketPath(gpu);
      if (path.length > 100) throw new Error(`socket path ${path} is too long for a Unix socket; set socketDir`);
      // A socket that answers is another daemon's: taking it over would cut off its engines.
      if (await answers(path)) {
        throw new ConfigError(
          `socketDir ${this.socketDir}: ${path} is in use by another daemon; give each its own socketDir`,
        );
      }
      rmSync(path, { force: true });
      const server = createServer((socket) => this.accept(gpu, socket));
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(path, () => resolve());
      });
      this.servers.push({ server, path });
      // Connecting needs write permission on the socket file: the daemon's user, or its group.
      if (gid !== undefined) chownSync(path, this.access.uid, gid);
      chmodSync(path, gid === undefined ? 0o600 : 0o660);
      const uuid = uuids[gpu];
      if (uuid !== undefined) this.link(uuid, path);
    }
  }

  private link(uuid: string, target: string): void {
    const alias = this.aliasPath(uuid);
    if (!/^[A-Za-z0-9-]+$/.test(uuid) || alias.length > 100) {
      this.log.warn({ uuid, alias }, "no alias by UUID for this GPU's socket (the path is too long, or the UUID odd)");
      return;
    }
    rmSync(alias, { force: true });
    symlinkSync(basename(target), alias);
    this.aliases.push(alias);
  }

  /** Who connected (SO_PEERCRED), or undefined when they may not: then they are cut off. */
  private admit(gpu: number, socket: Socket): PeerCred | undefined {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
    let cred: PeerCred;
    try {
      cred = this.access.peerCred(fd);
    } catch (err) {
      this.log.warn({ gpu, reason: (err as Error).message }, "receiver refused: its credentials are unknown");
      refuse(socket, "the daemon cannot tell who connected");
      return undefined;
    }
    const why = refusal(cred, this.access);
    if (why === undefined) return cred;
    this.log.warn({ gpu, uid: cred.uid, pid: cred.pid }, `receiver refused: ${why}`);
    refuse(socket, why);
    return undefined;
  }

  private accept(gpu: number, socket: Socket): void {
    const cred = this.admit(gpu, socket);
    if (!cred) return;
    const r = new Receiver(gpu, socket);
    r.pid = cred.pid;
    r.uid = cred.uid;
    this.receivers.add(r);
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      try {
        this.receive(r, chunk);
      } catch (err) {
        // Whatever a receiver sends costs at most its own connection.
        this.log.error({ receiver: r.label, err }, "a receiver's message could not be handled; disconnected");
        r.close();
      }
    });
    const gone = () => {
      if (!r.closed) this.log.info({ receiver: r.label }, "receiver disconnected");
      r.close();
      this.receivers.delete(r);
    };
    socket.on("close", gone);
    socket.on("error", gone);
  }

  /** Handles what a receiver sent: its hello once, then messages for the waits of updates. */
  private receive(r: Receiver, chunk: string): void {
    if (r.closed) return;
    for (const msg of r.feed(chunk)) {
      if (msg.op === "hello" && !r.ready) {
        r.name = typeof msg.name === "string" ? msg.name.slice(0, 100) : `pid-${r.pid}`;
        r.partial = msg.partial === true;
        r.stageBytes =
          Number.isSafeInteger(msg.stageBytes) && (msg.stageBytes as number) > 0 ? (msg.stageBytes as number) : 0;
        r.deltas = r.partial && msg.deltas === true;
        if (msg.protocol !== PROTOCOL) {
          r.send({ op: "refused", reason: `protocol ${preview(msg.protocol)} is not ${PROTOCOL}` });
          r.close();
          return;
        }
        r.ready = true;
        this.greet(r);
        this.log.info({ receiver: r.label, uid: r.uid }, "receiver connected");
      } else r.deliver(msg);
      if (r.violation) break;
    }
    if (r.violation) {
      this.log.warn({ receiver: r.label, reason: r.violation }, "receiver broke the protocol; disconnected");
      r.close();
    }
  }

  /** Receivers that said hello and are still connected. */
  connected(): Receiver[] {
    return [...this.receivers].filter((r) => r.ready && !r.closed);
  }

  async close(): Promise<void> {
    // No new receiver from here on; then each one takes what was sent to it and hangs up.
    const listening = this.servers.splice(0);
    const closed = listening.map(({ server }) => new Promise<void>((resolve) => server.close(() => resolve())));
    await Promise.all([...this.receivers].map((r) => r.end(END_MS)));
    await Promise.all(closed);
    for (const { path } of listening) rmSync(path, { force: true });
    for (const alias of this.aliases.splice(0)) rmSync(alias, { force: true });
  }
}
