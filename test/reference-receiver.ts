/**
 * A receiver written against integrations/PROTOCOL.md in TypeScript, for tests on the host
 * backend: it maps the slots through libckpt, assembles every tensor it is sent, and can be
 * told to fail, die or stall at a bucket.
 */
import { createConnection, type Socket } from "node:net";
import { type Context, type DeviceBuffer, Library, libraryPath } from "../ffi/index.ts";
import { ckptHash } from "./checkpoint-files.ts";

const LIB_DIR = new URL("../cuda-lib/build/", import.meta.url).pathname;

export interface Behaviour {
  /** Answer `error` at this bucket. */
  failAt?: number;
  /** Answer `error` at every bucket from this one on (never acks one when 0). */
  failFrom?: number;
  /** Close the socket at this bucket. */
  dieAt?: number;
  /** Never answer this bucket. */
  stallAt?: number;
  /** Ack every bucket, but never answer `end`. */
  neverDone?: boolean;
  /** Called with each bucket's number once its bytes are read, before the ack. */
  beforeAck?: (bucket: number) => void;
  /** Say `partial: true` in hello: updates may leave out what it holds (read at connect). */
  partial?: boolean;
  /** Say `deltas: true` as well: it applies deltas to the weights it holds. */
  deltas?: boolean;
  /** Say `stageBytes`: it can stage an atomic update of that many bytes. */
  stageBytes?: number;
  /** Answer `error` to `commit`. */
  failCommit?: boolean;
  /** Ack every bucket of an atomic update, then answer `error` to its `end` instead of `staged`. */
  failStage?: boolean;
}

/** A bucket entry (PROTOCOL.md). */
interface Entry {
  name: string;
  dtype: string;
  shape: number[];
  bytes: number;
  offset: number;
  range: [number, number];
  delta?: { count: number; positions: number; values: number };
}

const ELEMENT_BYTES: Record<string, number> = { BF16: 2, F16: 2, F32: 4, F64: 8, I32: 4, I64: 8, U8: 1, I8: 1 };

type Msg = { op: string; [k: string]: unknown };

export class ReferenceReceiver {
  readonly seen: Msg[] = [];
  /** Per finished update: tensor name -> ckpt hash of the assembled bytes. */
  readonly hashes = new Map<string, Map<string, string>>();
  /**
   * The engine's weights, written in place piece by piece as buckets come (as an engine
   * copies into its parameters), so an update that fails part-way leaves some of it behind.
   */
  private readonly weights = new Map<string, Uint8Array>();
  private socket?: Socket;
  private ctx?: Context;
  private slots: DeviceBuffer[] = [];
  private tensors = new Map<string, Uint8Array>();
  /** The deltas of this update being assembled: name -> bytes, and how many are still to come. */
  private deltaBytes = new Map<string, { bytes: Uint8Array; left: number }>();
  /** Every delta applied: which tensor, how many elements. */
  readonly deltasApplied: { name: string; count: number }[] = [];
  /** During an atomic update: the names that came as deltas (applied at commit by stagedDeltas). */
  private staging?: string[];
  private stagedDeltas: (() => void)[] = [];
  private buffered = "";
  private queue: Promise<void> = Promise.resolve();
  private readonly waiters: ((m: Msg) => void)[] = [];

  constructor(
    readonly socketPath: string,
    readonly name: string,
    public behaviour: Behaviour = {},
  ) {}

  async connect(): Promise<void> {
    this.ctx = await new Library(libraryPath(LIB_DIR, "host")).createContext({ hostDevices: 8 });
    const socket = createConnection(this.socketPath);
    this.socket = socket;
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      this.buffered += chunk;
      const lines = this.buffered.split("\n");
      this.buffered = lines.pop() ?? "";
      for (const line of lines) if (line) this.queue = this.queue.then(() => this.handle(JSON.parse(line)));
    });
    const partial = this.behaviour.partial ? { partial: true } : {};
    const deltas = this.behaviour.deltas ? { deltas: true } : {};
    const stage = this.behaviour.stageBytes ? { stageBytes: this.behaviour.stageBytes } : {};
    this.send({ op: "hello", protocol: 1, pid: process.pid, name: this.name, ...partial, ...deltas, ...stage });
    await this.next("buffers");
  }

  /** Resolves with the next message of this op. */
  next(op: string): Promise<Msg> {
    return new Promise((resolve) => {
      const w = (m: Msg) => {
        if (m.op !== op) return;
        this.waiters.splice(this.waiters.indexOf(w), 1);
        resolve(m);
      };
      this.waiters.push(w);
    });
  }

  /** Resolves with how `update` ended here: "done" (it got `end`), or "abort". */
  ended(update: string): Promise<"done" | "abort"> {
    const how = (m: Msg) => (m.update === update && (m.op === "end" || m.op === "abort") ? m.op : undefined);
    const seen = this.seen.map(how).find((x) => x !== undefined);
    if (seen) return Promise.resolve(seen === "end" ? "done" : "abort");
    return new Promise((resolve) => {
      const w = (m: Msg) => {
        const op = how(m);
        if (!op) return;
        this.waiters.splice(this.waiters.indexOf(w), 1);
        resolve(op === "end" ? "done" : "abort");
      };
      this.waiters.push(w);
    });
  }

  private send(m: Msg): void {
    this.socket?.write(`${JSON.stringify(m)}\n`);
  }

  private async handle(m: Msg): Promise<void> {
    this.seen.push(m);
    const ctx = this.ctx as Context;
    if (m.op === "buffers") {
      for (const b of this.slots) await ctx.bufFree(b);
      this.slots = [];
      for (const s of m.slots as { bytes: number; path: string }[]) {
        const data = new Uint8Array(128);
        data.set(Buffer.from(s.path));
        const pid = Number(s.path.split("/")[2]);
        this.slots.push(await ctx.bufImport({ kind: 2, len: s.bytes, device: 0, pid, data }));
      }
    } else if (m.op === "begin") {
      this.tensors = new Map();
      this.deltaBytes = new Map();
      this.staging = m.stage === true ? [] : undefined;
    } else if (m.op === "bucket") {
      const bucket = m.bucket as number;
      if (this.behaviour.dieAt === bucket) {
        this.socket?.destroy();
        return;
      }
      if (this.behaviour.stallAt === bucket) return;
      const { failAt, failFrom } = this.behaviour;
      if (failAt === bucket || (failFrom !== undefined && bucket >= failFrom)) {
        this.send({ op: "error", update: m.update, bucket, message: `injected failure at bucket ${bucket}` });
        return;
      }
      const slot = this.slots[m.slot as number] as DeviceBuffer;
      for (const t of m.tensors as Entry[]) {
        if (t.delta) {
          await this.deltaPiece(slot, t);
          continue;
        }
        let whole = this.tensors.get(t.name);
        if (!whole) {
          whole = new Uint8Array(t.bytes);
          this.tensors.set(t.name, whole);
        }
        await ctx.bufRead(slot, t.offset, whole.subarray(t.range[0], t.range[1]));
        if (this.staging) continue; // applied at commit, from this.tensors
        let weight = this.weights.get(t.name);
        if (weight?.byteLength !== t.bytes) {
          weight = new Uint8Array(t.bytes);
          this.weights.set(t.name, weight);
        }
        weight.set(whole.subarray(t.range[0], t.range[1]), t.range[0]);
      }
      this.behaviour.beforeAck?.(bucket);
      this.send({ op: "ack", update: m.update, bucket });
    } else if (m.op === "end" && this.staging) {
      if (this.behaviour.failStage) this.send({ op: "error", update: m.update, message: "injected failure to stage" });
      else this.send({ op: "staged", update: m.update });
    } else if (m.op === "end" && !this.behaviour.neverDone) {
      await this.finished(m.update as string);
      this.send({ op: "done", update: m.update });
    } else if (m.op === "commit" && this.staging) {
      if (this.behaviour.failCommit) {
        this.send({ op: "error", update: m.update, message: "injected failure at commit" });
      } else {
        const started = performance.now();
        for (const [name, bytes] of this.tensors)
          if (!this.staging.includes(name)) this.weights.set(name, bytes.slice());
        for (const d of this.stagedDeltas.splice(0)) d();
        this.staging = undefined;
        await this.finished(m.update as string);
        this.send({ op: "committed", update: m.update, windowMs: performance.now() - started });
      }
    } else if (m.op === "abort") {
      this.staging = undefined;
      this.stagedDeltas = [];
    }
    for (const w of [...this.waiters]) w(m);
  }

  /** The hashes of what an update delivered (the tensors it sent, whole), under its id. */
  private async finished(update: string): Promise<void> {
    const hashes = new Map<string, string>();
    for (const [name, bytes] of this.tensors) hashes.set(name, await ckptHash(bytes));
    this.hashes.set(update, hashes);
  }

  /** A piece of a delta: once all its bytes came, applies it to the weight in place (atomic: at commit). */
  private async deltaPiece(slot: DeviceBuffer, t: Entry): Promise<void> {
    const ctx = this.ctx as Context;
    let got = this.deltaBytes.get(t.name);
    if (!got) {
      got = { bytes: new Uint8Array(t.bytes), left: t.bytes };
      this.deltaBytes.set(t.name, got);
    }
    await ctx.bufRead(slot, t.offset, got.bytes.subarray(t.range[0], t.range[1]));
    got.left -= t.range[1] - t.range[0];
    if (got.left > 0) return;
    if (this.staging) {
      this.staging.push(t.name); // a delta: its tensor is made at commit
      const bytes = got.bytes;
      this.stagedDeltas.push(() => this.patch(t, bytes));
      return;
    }
    this.patch(t, got.bytes);
  }

  /** Applies a whole delta's bytes to the weight it patches. */
  private patch(t: Entry, bytes: Uint8Array): void {
    const { count, positions, values } = t.delta as NonNullable<Entry["delta"]>;
    const elem = ELEMENT_BYTES[t.dtype] as number;
    const weight = this.weights.get(t.name);
    const size = t.shape.reduce((a, b) => a * b, 1) * elem;
    if (weight?.byteLength !== size) throw new Error(`a delta of ${t.name}, which this receiver does not hold`);
    const view = new DataView(bytes.buffer);
    for (let i = 0; i < count; i++) {
      const at = view.getUint32(positions + 4 * i, true) * elem;
      weight.set(bytes.subarray(values + i * elem, values + (i + 1) * elem), at);
    }
    this.tensors.set(t.name, weight.slice());
    this.deltasApplied.push({ name: t.name, count });
  }

  /** The engine's weights now: name -> ckpt hash. */
  async model(): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const [name, bytes] of this.weights) out.set(name, await ckptHash(bytes));
    return out;
  }

  /** Disconnects and frees the mappings; safe to call twice. */
  async close(): Promise<void> {
    this.socket?.destroy();
    await this.queue.catch(() => undefined);
    const ctx = this.ctx;
    this.ctx = undefined;
    for (const b of this.slots) await ctx?.bufFree(b);
    this.slots = [];
    await ctx?.destroy();
  }

  /** Resolves once a message matching `pred` has been seen (already, or later). */
  async saw(pred: (m: Msg) => boolean, timeoutMs = 2000): Promise<boolean> {
    const until = Date.now() + timeoutMs;
    while (Date.now() < until) {
      if (this.seen.some(pred)) return true;
      await new Promise((r) => setTimeout(r, 5));
    }
    return false;
  }
}
