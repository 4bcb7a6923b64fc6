/**
 * The daemon's side of the receiver protocol (integrations/PROTOCOL.md): one Unix socket per
 * GPU, JSON lines, receivers that connect, say hello and then follow updates.
 */
import { mkdirSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import type { Logger } from "pino";

export const PROTOCOL = 1;

export type Message = { op: string; [key: string]: unknown };

/** One connected engine process on one GPU. */
export class Receiver {
  name = "unnamed";
  pid = 0;
  ready = false;
  closed = false;
  private buffered = "";
  private readonly waiters = new Set<(msg: Message | undefined) => void>();
  /** Messages not yet consumed by a waiter (acks arriving early, errors). */
  readonly inbox: Message[] = [];

  constructor(
    readonly gpu: number,
    readonly socket: Socket,
    private readonly log: Logger,
  ) {}

  get label(): string {
    return `${this.name} (pid ${this.pid}, GPU ${this.gpu})`;
  }

  send(msg: Message): void {
    if (!this.closed) this.socket.write(`${JSON.stringify(msg)}\n`);
  }

  /** Feeds received bytes; returns the complete messages. */
  feed(chunk: string): Message[] {
    this.buffered += chunk;
    const lines = this.buffered.split("\n");
    this.buffered = lines.pop() ?? "";
    const out: Message[] = [];
    for (const line of lines) {
      if (!line.trim()) continue;
      try {
        const msg = JSON.parse(line);
        if (typeof msg?.op === "string") out.push(msg);
        else this.log.warn({ receiver: this.label, line }, "receiver sent a message without op");
      } catch {
        this.log.warn({ receiver: this.label, line: line.slice(0, 200) }, "receiver sent malformed JSON");
      }
    }
    return out;
  }

  deliver(msg: Message): void {
    this.inbox.push(msg);
    for (const w of [...this.waiters]) w(msg);
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
   * Resolves with the first inbox message matching `pred` (consuming it), or rejects when
   * the receiver disconnects, sends an error for this update, or `timeoutMs` passes.
   */
  expect(pred: (m: Message) => boolean, update: string, timeoutMs: number, what: string): Promise<Message> {
    return new Promise((resolve, reject) => {
      const scan = (): boolean => {
        // An error for the update fails every wait of it, so it stays in the inbox.
        const failed = this.inbox.find((m) => m.op === "error" && m.update === update);
        if (failed) {
          cleanup();
          reject(new ReceiverError(this, `failed: ${String(failed.message)}`));
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
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
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

/** The sockets of all GPUs and the receivers connected to them. */
export class ReceiverHub {
  private readonly servers: Server[] = [];
  private readonly receivers = new Set<Receiver>();

  constructor(
    readonly socketDir: string,
    private readonly gpus: number,
    private readonly log: Logger,
    /** Messages a new receiver gets after hello (welcome, buffers). */
    private readonly greet: (r: Receiver) => void,
  ) {}

  socketPath(gpu: number): string {
    return join(this.socketDir, `gpu-${gpu}.sock`);
  }

  async listen(): Promise<void> {
    mkdirSync(this.socketDir, { recursive: true, mode: 0o700 });
    for (let gpu = 0; gpu < this.gpus; gpu++) {
      const path = this.socketPath(gpu);
      if (path.length > 100) throw new Error(`socket path ${path} is too long for a Unix socket; set socketDir`);
      rmSync(path, { force: true });
      const server = createServer((socket) => this.accept(gpu, socket));
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(path, () => resolve());
      });
      this.servers.push(server);
    }
  }

  private accept(gpu: number, socket: Socket): void {
    const r = new Receiver(gpu, socket, this.log);
    this.receivers.add(r);
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      for (const msg of r.feed(chunk)) {
        if (msg.op === "hello" && !r.ready) {
          r.name = typeof msg.name === "string" ? msg.name : `pid-${msg.pid}`;
          r.pid = Number(msg.pid) || 0;
          if (msg.protocol !== PROTOCOL) {
            r.send({ op: "refused", reason: `protocol ${msg.protocol} is not ${PROTOCOL}` });
            r.close();
            return;
          }
          r.ready = true;
          this.greet(r);
          this.log.info({ receiver: r.label }, "receiver connected");
        } else r.deliver(msg);
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

  /** Receivers that said hello and are still connected. */
  connected(): Receiver[] {
    return [...this.receivers].filter((r) => r.ready && !r.closed);
  }

  async close(): Promise<void> {
    for (const r of this.receivers) r.close();
    await Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (let gpu = 0; gpu < this.gpus; gpu++) rmSync(this.socketPath(gpu), { force: true });
  }
}
