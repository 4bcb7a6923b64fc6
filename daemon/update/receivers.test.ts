/** The receiver protocol's daemon side: framing, waits, and the hub of per-GPU sockets. */
import { existsSync, mkdirSync, readdirSync, readlinkSync, statSync, writeFileSync } from "node:fs";
import { createConnection, type Socket } from "node:net";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import type { PeerCred } from "../../ffi/index.ts";
import { tempDir } from "../../test/helpers.ts";
import type { EngineAccess } from "./engine-access.ts";
import { MAX_INVALID, type Message, Receiver, ReceiverError, ReceiverHub } from "./receivers.ts";

/** Access for a daemon of uid 1000 whose connecting processes the kernel reports as `cred`. */
const accessOf = (cred: () => PeerCred, group?: EngineAccess["group"]) => ({ uid: 1000, group, peerCred: cred });
const ENGINE: PeerCred = { pid: 4242, uid: 1000, gid: 1000, groups: [] };

/** A socket stand-in that records what the daemon wrote and whether it hung up. */
function fakeSocket() {
  const written: string[] = [];
  let destroyed = 0;
  const socket = {
    write: (s: string) => {
      written.push(s);
      return true;
    },
    destroy: () => {
      destroyed++;
    },
  } as unknown as Socket;
  return { socket, written, destroyed: () => destroyed };
}

function receiver(gpu = 0) {
  const fake = fakeSocket();
  return { r: new Receiver(gpu, fake.socket), ...fake };
}

/** The rejection of `p` (fails if it resolves). */
async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error("expected a rejection");
}

const isAck = (bucket: number) => (m: Message) => m.op === "ack" && m.bucket === bucket;

describe("Receiver framing", () => {
  it("returns exactly the complete messages and keeps a partial line for the next chunk", () => {
    const { r } = receiver();
    expect(r.feed('{"op":"a"}\n{"op":')).toEqual([{ op: "a" }]);
    expect(r.feed('"b","x":1}\n')).toEqual([{ op: "b", x: 1 }]);
    expect(r.feed('{"op":"c"}')).toEqual([]);
    expect(r.feed("\n")).toEqual([{ op: "c" }]);
    expect(r.violation).toBeUndefined();
  });

  it("skips empty and blank lines without counting them as invalid", () => {
    const { r } = receiver();
    expect(r.feed('\n\n   \n\t\n \r\n\n{"op":"a"}\n\n')).toEqual([{ op: "a" }]);
    expect(r.violation).toBeUndefined();
  });

  it("counts null, non-objects and ops that are not strings as invalid, naming the first", () => {
    const { r } = receiver();
    expect(r.feed('null\n{"op":"a"}\n')).toEqual([{ op: "a" }]);
    expect(r.violation).toBeUndefined();
    expect(r.feed('{"op":5}\n')).toEqual([]);
    expect(r.violation).toBeUndefined();
    expect(r.feed('not json\n{"op":"b"}\n')).toEqual([]);
    expect(r.violation).toBe(`sent ${MAX_INVALID} invalid messages (not JSON with an "op"), the first: null`);
  });
});

describe("Receiver inbox", () => {
  it("starts empty and keeps delivered messages in order", () => {
    const { r } = receiver();
    expect(r.inbox).toEqual([]);
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    r.deliver({ op: "ack", update: "u", bucket: 2 });
    expect(r.inbox).toEqual([
      { op: "ack", update: "u", bucket: 1 },
      { op: "ack", update: "u", bucket: 2 },
    ]);
  });

  it("forget drops every message of that update, the first one too, and only those", () => {
    const { r } = receiver();
    r.deliver({ op: "ack", update: "old", bucket: 0 });
    r.deliver({ op: "ack", update: "new", bucket: 0 });
    r.deliver({ op: "ping" });
    r.deliver({ op: "ack", update: "old", bucket: 1 });
    r.deliver({ op: "error", update: "old", message: "x" });
    r.forget("old");
    expect(r.inbox).toEqual([{ op: "ack", update: "new", bucket: 0 }, { op: "ping" }]);
  });
});

describe("Receiver.send and close", () => {
  it("writes one JSON line per message while connected, nothing after close", () => {
    const { r, written, destroyed } = receiver();
    r.send({ op: "bucket", bucket: 3 });
    expect(written).toEqual(['{"op":"bucket","bucket":3}\n']);
    r.close();
    expect(r.closed).toBe(true);
    expect(destroyed()).toBe(1);
    r.send({ op: "bucket", bucket: 4 });
    expect(written).toHaveLength(1);
  });

  it("names itself by connection before hello, by name, pid and GPU after", () => {
    const { r } = receiver(2);
    expect(r.label).toBe(`connection #${r.connection} (pid 0, GPU 2, no hello yet)`);
    r.pid = 7;
    expect(r.label).toBe(`connection #${r.connection} (pid 7, GPU 2, no hello yet)`);
    r.name = "vllm";
    r.ready = true;
    expect(r.label).toBe("vllm (pid 7, GPU 2)");
  });
});

describe("Receiver.expect", () => {
  it("resolves with a message already in the inbox and consumes only it", async () => {
    const { r } = receiver();
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    r.deliver({ op: "ack", update: "u", bucket: 2 });
    await expect(r.expect(isAck(2), "u", 1000, "the ack")).resolves.toEqual({ op: "ack", update: "u", bucket: 2 });
    expect(r.inbox).toEqual([{ op: "ack", update: "u", bucket: 1 }]);
  });

  it("resolves with a message that arrives later, and stops watching once resolved", async () => {
    const { r } = receiver();
    const waiting = r.expect(isAck(1), "u", 1000, "the ack");
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    await expect(waiting).resolves.toEqual({ op: "ack", update: "u", bucket: 1 });
    // A settled wait must not consume what comes next.
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    expect(r.inbox).toEqual([{ op: "ack", update: "u", bucket: 1 }]);
  });

  it("fails on an error for its update, leaving the error for the other waits", async () => {
    const { r } = receiver();
    r.pid = 9;
    r.name = "eng";
    r.ready = true;
    const a = r.expect(isAck(1), "u", 1000, "the ack of bucket 1");
    const b = r.expect(isAck(2), "u", 1000, "the ack of bucket 2");
    r.deliver({ op: "error", update: "u", message: "out of memory" });
    const err = await rejection(a);
    expect(err).toBeInstanceOf(ReceiverError);
    expect(err.name).toBe("ReceiverError");
    expect(err.message).toBe("receiver eng (pid 9, GPU 0) failed: out of memory");
    expect((err as ReceiverError).receiver).toBe(r);
    expect((await rejection(b)).message).toBe("receiver eng (pid 9, GPU 0) failed: out of memory");
    expect(r.inbox).toEqual([{ op: "error", update: "u", message: "out of memory" }]);
  });

  it("ignores an error of another update", async () => {
    const { r } = receiver();
    r.deliver({ op: "error", update: "other", message: "boom" });
    const waiting = r.expect(isAck(1), "u", 1000, "the ack");
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    await expect(waiting).resolves.toEqual({ op: "ack", update: "u", bucket: 1 });
  });

  it("fails when the receiver disconnects during the wait", async () => {
    const { r } = receiver();
    const waiting = r.expect(isAck(1), "u", 5000, "the ack of bucket 1");
    r.close();
    const err = await rejection(waiting);
    expect(err).toBeInstanceOf(ReceiverError);
    expect(err.message).toBe(
      `receiver connection #${r.connection} (pid 0, GPU 0, no hello yet) disconnected while the daemon waited for the ack of bucket 1`,
    );
  });

  it("fails at once on a receiver already disconnected, even with a matching message", async () => {
    const { r } = receiver();
    r.deliver({ op: "ack", update: "u", bucket: 1 });
    r.close();
    const err = await rejection(r.expect(isAck(1), "u", 5000, "the ack of bucket 1"));
    expect(err.message).toBe(
      `receiver connection #${r.connection} (pid 0, GPU 0, no hello yet) disconnected before the ack of bucket 1`,
    );
  });

  it("fails after the timeout, naming what it waited for", async () => {
    const { r } = receiver();
    const err = await rejection(r.expect(isAck(1), "u", 20, "the ack of bucket 1"));
    expect(err.message).toBe(
      `receiver connection #${r.connection} (pid 0, GPU 0, no hello yet) did not answer within 20 ms (waiting for the ack of bucket 1)`,
    );
  });

  it("fails with the abort reason, whether aborted before or during the wait", async () => {
    const { r } = receiver();
    const before = new AbortController();
    before.abort("peer failed");
    expect((await rejection(r.expect(isAck(1), "u", 5000, "x", before.signal))).message).toBe("peer failed");
    const during = new AbortController();
    const waiting = r.expect(isAck(1), "u", 5000, "x", during.signal);
    during.abort("stopped");
    expect((await rejection(waiting)).message).toBe("stopped");
  });
});

describe("ReceiverHub", () => {
  const hubs: ReceiverHub[] = [];
  const clients: Socket[] = [];
  afterEach(async () => {
    for (const c of clients.splice(0)) c.destroy();
    for (const h of hubs.splice(0)) await h.close();
  });

  async function hub(
    gpus = 1,
    socketDir = join(tempDir(), "sockets"),
    access: ReturnType<typeof accessOf> = accessOf(() => ENGINE),
  ) {
    mkdirSync(socketDir, { recursive: true, mode: 0o700 });
    const logs: { msg: string; receiver?: string; uid?: number; pid?: number; reason?: string }[] = [];
    const log = pino({ level: "info" }, { write: (line: string) => logs.push(JSON.parse(line)) });
    const greeted: Receiver[] = [];
    const h = new ReceiverHub(
      socketDir,
      gpus,
      log,
      (r) => {
        greeted.push(r);
        r.send({ op: "welcome", gpu: r.gpu });
      },
      access,
    );
    await h.listen();
    hubs.push(h);
    return { h, logs, greeted, socketDir };
  }

  /** A client on `path`: the lines it received, and a promise of the daemon hanging up. */
  async function client(path: string) {
    const socket = createConnection(path);
    clients.push(socket);
    socket.on("error", () => undefined);
    const lines: Message[] = [];
    let buffered = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      const parts = (buffered + chunk).split("\n");
      buffered = parts.pop() ?? "";
      for (const p of parts) lines.push(JSON.parse(p));
    });
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    await new Promise<void>((resolve) => socket.once("connect", () => resolve()));
    const send = (m: unknown) => socket.write(`${JSON.stringify(m)}\n`);
    return { socket, lines, closed, send };
  }

  const until = async (cond: () => boolean, ms = 2000) => {
    const end = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > end) throw new Error("condition not met in time");
      await new Promise((r) => setTimeout(r, 5));
    }
  };

  it("listens on one socket per GPU and removes exactly those on close", async () => {
    const { h, socketDir } = await hub(2);
    expect(readdirSync(socketDir).sort()).toEqual(["gpu-0.sock", "gpu-1.sock"]);
    expect(h.socketPath(1)).toBe(join(socketDir, "gpu-1.sock"));
    writeFileSync(join(socketDir, "gpu-2.sock"), "not ours");
    await h.close();
    hubs.length = 0;
    expect(readdirSync(socketDir)).toEqual(["gpu-2.sock"]);
  });

  it("links each GPU's UUID to its socket, and removes the links on close", async () => {
    const socketDir = join(tempDir(), "sockets");
    mkdirSync(socketDir, { mode: 0o700 });
    const h = new ReceiverHub(
      socketDir,
      2,
      pino({ level: "silent" }),
      (r) => r.send({ op: "welcome" }),
      accessOf(() => ENGINE),
    );
    hubs.push(h);
    writeFileSync(join(socketDir, "GPU-bb.sock"), "stale");
    await h.listen(["GPU-aa-0", "GPU-bb"]);
    expect(readlinkSync(h.aliasPath("GPU-aa-0"))).toBe("gpu-0.sock");
    expect(readlinkSync(join(socketDir, "GPU-bb.sock"))).toBe("gpu-1.sock");
    const c = await client(h.aliasPath("GPU-bb"));
    c.send({ op: "hello", protocol: 1, name: "by-uuid" });
    await until(() => c.lines.length > 0);
    expect(h.connected().map((r) => [r.name, r.gpu])).toEqual([["by-uuid", 1]]);
    await h.close();
    hubs.length = 0;
    expect(readdirSync(socketDir)).toEqual([]);
  });

  it("makes no alias for a UUID that is not a plain name", async () => {
    const socketDir = join(tempDir(), "sockets");
    mkdirSync(socketDir, { mode: 0o700 });
    const h = new ReceiverHub(
      socketDir,
      1,
      pino({ level: "silent" }),
      () => undefined,
      accessOf(() => ENGINE),
    );
    hubs.push(h);
    await h.listen(["../escape"]);
    expect(readdirSync(socketDir)).toEqual(["gpu-0.sock"]);
    expect(readdirSync(join(socketDir, ".."))).not.toContain("escape.sock");
  });

  it("refuses a socket directory whose sockets another daemon answers on", async () => {
    const { socketDir } = await hub(1);
    const second = new ReceiverHub(
      socketDir,
      1,
      pino({ level: "silent" }),
      () => undefined,
      accessOf(() => ENGINE),
    );
    await expect(second.listen()).rejects.toThrow(
      `socketDir ${socketDir}: ${join(socketDir, "gpu-0.sock")} is in use by another daemon; give each its own socketDir`,
    );
  });

  it("leaves no server listening after close", async () => {
    const servers = () => process.getActiveResourcesInfo().filter((t) => t === "PipeWrap").length;
    await new Promise((r) => setTimeout(r, 20));
    const base = servers();
    const { h } = await hub(2);
    await new Promise((r) => setTimeout(r, 20)); // listen's probes of the paths are gone
    expect(servers()).toBe(base + 2);
    await h.close();
    hubs.length = 0;
    await new Promise((r) => setTimeout(r, 20));
    expect(servers()).toBe(base);
  });

  it("accepts a socket path of 100 characters and refuses a longer one", async () => {
    const base = tempDir();
    const fill = (n: number) => join(base, "d".repeat(n - base.length - "/".length - "/gpu-0.sock".length));
    const ok = fill(100);
    expect(join(ok, "gpu-0.sock")).toHaveLength(100);
    await hub(1, ok);
    const long = fill(101);
    mkdirSync(long, { recursive: true });
    const h = new ReceiverHub(
      long,
      1,
      pino({ level: "silent" }),
      () => undefined,
      accessOf(() => ENGINE),
    );
    await expect(h.listen()).rejects.toThrow(
      `socket path ${join(long, "gpu-0.sock")} is too long for a Unix socket; set socketDir`,
    );
  });

  it("rejects listen when the socket cannot be bound", async () => {
    const h = new ReceiverHub(
      "/proc/self",
      1,
      pino({ level: "silent" }),
      () => undefined,
      accessOf(() => ENGINE),
    );
    await expect(h.listen()).rejects.toMatchObject({ code: "EACCES" });
  });

  it("greets a receiver once after hello, names it, and delivers its later messages", async () => {
    const { h, logs, greeted } = await hub(1);
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, pid: 42, name: "vllm-0" });
    await until(() => c.lines.length > 0);
    expect(c.lines).toEqual([{ op: "welcome", gpu: 0 }]);
    const [r] = h.connected();
    expect(r?.label).toBe("vllm-0 (pid 4242, GPU 0)");
    expect(logs.filter((l) => l.msg === "receiver connected").map((l) => l.receiver)).toEqual([
      "vllm-0 (pid 4242, GPU 0)",
    ]);
    c.send({ op: "ack", update: "u", bucket: 0 });
    c.send({ op: "hello", protocol: 1, pid: 43, name: "again" });
    await until(() => (r?.inbox.length ?? 0) === 2);
    expect(r?.inbox).toEqual([
      { op: "ack", update: "u", bucket: 0 },
      { op: "hello", protocol: 1, pid: 43, name: "again" },
    ]);
    expect(greeted).toEqual([r]);
    expect(r?.label).toBe("vllm-0 (pid 4242, GPU 0)");
  });

  it("makes its sockets 0600, or 0660 owned by engineGroup when one is set", async () => {
    const { h } = await hub(1);
    expect(statSync(h.socketPath(0)).mode & 0o777).toBe(0o600);
    const group = { name: "engines", gid: 4321, members: new Set<number>() };
    const { h: shared } = await hub(
      2,
      join(tempDir(), "sockets"),
      accessOf(() => ENGINE, group),
    );
    for (const gpu of [0, 1]) {
      const st = statSync(shared.socketPath(gpu));
      expect([st.mode & 0o777, st.uid, st.gid]).toEqual([0o660, 1000, 4321]);
    }
  });

  it("takes the pid from the kernel, not from hello, and logs the uid", async () => {
    const { h, logs } = await hub(
      1,
      undefined,
      accessOf(() => ({ pid: 77, uid: 0, gid: 0, groups: [] })),
    );
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, pid: 1, name: "vllm" });
    await until(() => h.connected().length === 1);
    expect(h.connected()[0]?.label).toBe("vllm (pid 77, GPU 0)");
    expect(h.connected()[0]?.uid).toBe(0);
    expect(logs.find((l) => l.msg === "receiver connected")?.uid).toBe(0);
  });

  it("cuts off a process of another user, and one whose credentials cannot be read", async () => {
    const { h: other, logs } = await hub(
      1,
      undefined,
      accessOf(() => ({ pid: 5, uid: 2000, gid: 2000, groups: [] })),
    );
    const a = await client(other.socketPath(0));
    await a.closed;
    expect(a.lines).toEqual([
      {
        op: "refused",
        reason: "uid 2000 is not the daemon's user (uid 1000); engines of other users need engineGroup",
      },
    ]);
    expect(other.connected()).toEqual([]);
    expect(logs.map((l) => [l.msg, l.uid, l.pid])).toEqual([
      [
        "receiver refused: uid 2000 is not the daemon's user (uid 1000); engines of other users need engineGroup",
        2000,
        5,
      ],
    ]);
    const broken = await hub(
      1,
      undefined,
      accessOf(() => {
        throw new Error("ckpt_peer_cred: EBADF");
      }),
    );
    const b = await client(broken.h.socketPath(0));
    await b.closed;
    expect(b.lines).toEqual([{ op: "refused", reason: "the daemon cannot tell who connected" }]);
    expect(broken.logs.map((l) => [l.msg, l.reason])).toEqual([
      ["receiver refused: its credentials are unknown", "ckpt_peer_cred: EBADF"],
    ]);
  });

  it("admits another user's process that is in engineGroup by its supplementary groups", async () => {
    const group = { name: "engines", gid: 4321, members: new Set<number>() };
    const cred = { pid: 6, uid: 2000, gid: 2000, groups: [10, 4321] };
    const { h } = await hub(
      1,
      undefined,
      accessOf(() => cred, group),
    );
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, name: "other-user" });
    await until(() => h.connected().length === 1);
    expect(h.connected()[0]?.uid).toBe(2000);
  });

  it("names a receiver without a name by its pid", async () => {
    const { h } = await hub(1);
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, pid: 42 });
    await until(() => h.connected().length === 1);
    expect(h.connected()[0]?.label).toBe("pid-4242 (pid 4242, GPU 0)");
  });

  it("refuses another protocol version and hangs up", async () => {
    const { h, greeted } = await hub(1);
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 2, pid: 42, name: "new" });
    await c.closed;
    expect(c.lines).toEqual([{ op: "refused", reason: "protocol 2 is not 1" }]);
    expect(greeted).toEqual([]);
    expect(h.connected()).toEqual([]);
  });

  it("counts only receivers that said hello and are still connected", async () => {
    const { h } = await hub(1);
    const silent = await client(h.socketPath(0));
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, pid: 1, name: "a" });
    await until(() => h.connected().length === 1);
    silent.send({ op: "ping" });
    await new Promise((r) => setTimeout(r, 50));
    expect(h.connected().map((r) => r.name)).toEqual(["a"]);
    h.connected()[0]?.close();
    expect(h.connected()).toEqual([]);
  });

  it("logs a receiver that hangs up once, and one the daemon cut off only as a violation", async () => {
    const { h, logs } = await hub(1);
    const a = await client(h.socketPath(0));
    a.send({ op: "hello", protocol: 1, pid: 1, name: "a" });
    await until(() => h.connected().length === 1);
    a.socket.end();
    await until(() => logs.some((l) => l.msg === "receiver disconnected"));
    expect(logs.filter((l) => l.msg === "receiver disconnected").map((l) => l.receiver)).toEqual([
      "a (pid 4242, GPU 0)",
    ]);

    const b = await client(h.socketPath(0));
    b.send({ op: "hello", protocol: 1, pid: 2, name: "b" });
    for (let i = 0; i < MAX_INVALID; i++) b.socket.write("junk\n");
    await b.closed;
    await new Promise((r) => setTimeout(r, 20));
    expect(logs.filter((l) => l.msg === "receiver broke the protocol; disconnected").map((l) => l.receiver)).toEqual([
      "b (pid 4242, GPU 0)",
    ]);
    expect(logs.filter((l) => l.msg === "receiver disconnected")).toHaveLength(1);
  });

  it("hangs up on its receivers when it closes", async () => {
    const { h, socketDir } = await hub(1);
    const c = await client(h.socketPath(0));
    c.send({ op: "hello", protocol: 1, pid: 1, name: "a" });
    await until(() => h.connected().length === 1);
    await h.close();
    hubs.length = 0;
    await c.closed;
    expect(existsSync(join(socketDir, "gpu-0.sock"))).toBe(false);
  });
});
