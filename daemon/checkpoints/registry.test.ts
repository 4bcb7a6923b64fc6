import { copyFileSync, existsSync, readFileSync, readlinkSync, renameSync, statSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Context, type HostMemory, openBackend } from "../../ffi/index.ts";
import { ckptHash, writeSafetensors } from "../../test/checkpoint-files.ts";
import { tempDir, thrown } from "../../test/helpers.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import { DaemonError } from "../errors.ts";
import { FilePolicy } from "./confine.ts";
import {
  CheckpointVersion,
  checkName,
  type FileRecord,
  parseRef,
  type RegisterRequest,
  Registry,
  type RegistryOptions,
  type TensorRecord,
} from "./registry.ts";

/** The real host context, recording what is mapped and allocated, with hooks before each call. */
class SpyContext extends Context {
  /** Mappings and allocations not yet released, by address. */
  readonly live = new Map<bigint, { kind: "map" | "alloc"; mem: HostMemory }>();
  readonly registered = new Set<bigint>();
  /** Runs (and is awaited) before the real call; throwing fails the call without making it. */
  readonly before: Record<string, ((...args: never[]) => unknown) | undefined> = {};

  constructor(real: Context) {
    super(real.lib, real.ptr);
  }

  private async hook(method: string, args: unknown[]): Promise<void> {
    await this.before[method]?.(...(args as never[]));
  }

  override async hostAlloc(len: number): Promise<HostMemory> {
    await this.hook("hostAlloc", [len]);
    const mem = await super.hostAlloc(len);
    this.live.set(mem.address, { kind: "alloc", mem });
    return mem;
  }

  override async hostFree(mem: HostMemory): Promise<void> {
    await this.hook("hostFree", [mem]);
    await super.hostFree(mem);
    this.live.delete(mem.address);
  }

  override async fileMap(path: string): Promise<HostMemory> {
    await this.hook("fileMap", [path]);
    const mem = await super.fileMap(path);
    this.live.set(mem.address, { kind: "map", mem });
    return mem;
  }

  override async fileUnmap(mem: HostMemory): Promise<void> {
    await this.hook("fileUnmap", [mem]);
    await super.fileUnmap(mem);
    this.live.delete(mem.address);
  }

  override async hostRegister(address: bigint, len: number, readonly = false): Promise<HostMemory> {
    await this.hook("hostRegister", [address, len]);
    const mem = await super.hostRegister(address, len, readonly);
    this.registered.add(address);
    return mem;
  }

  override async hostUnregister(mem: HostMemory): Promise<void> {
    await super.hostUnregister(mem);
    this.registered.delete(mem.address);
  }

  override async fileReadHash(
    path: string,
    offset: number,
    len: number,
    dst: bigint,
    ranges: BigUint64Array,
    threads: number,
  ): Promise<BigUint64Array> {
    await this.hook("fileReadHash", [path, offset, len, dst, ranges, threads]);
    return super.fileReadHash(path, offset, len, dst, ranges, threads);
  }

  override async hash(
    ranges: BigUint64Array,
    threads: number,
    onProgress?: (bytes: number) => void,
    everyMs?: number,
  ): Promise<BigUint64Array> {
    await this.hook("hash", [ranges]);
    return super.hash(ranges, threads, onProgress, everyMs);
  }

  /** Releases what a test left (after an injected failure), without the hooks. */
  async releaseLeft(real: Context): Promise<void> {
    for (const { kind, mem } of this.live.values()) {
      if (this.registered.has(mem.address)) await real.hostUnregister(mem).catch(() => undefined);
      await (kind === "map" ? real.fileUnmap(mem) : real.hostFree(mem)).catch(() => undefined);
    }
    this.live.clear();
  }
}

let real: Context;
const made: { registry: Registry; ctx: SpyContext }[] = [];

beforeAll(async () => {
  real = (await openBackend("host", LIB_DIR)).context;
});

afterEach(async () => {
  for (const { registry, ctx } of made.splice(0)) {
    for (const k of Object.keys(ctx.before)) ctx.before[k] = undefined;
    await registry.close();
    await ctx.releaseLeft(real);
  }
});

afterAll(async () => {
  await real.destroy();
});

interface LogLine {
  level: number;
  msg: string;
  err?: { message: string };
  [key: string]: unknown;
}

/** A registry on the host backend, its spy context and what it logged. */
function newRegistry(overrides: Partial<RegistryOptions> = {}) {
  const ctx = new SpyContext(real);
  const logs: LogLine[] = [];
  const log = pino({ level: "debug" }, { write: (line: string) => logs.push(JSON.parse(line)) });
  const files = new FilePolicy({ roots: ["/dev/shm", tmpdir()], uploadDir: tempDir(), uid: process.getuid?.() ?? 0 });
  const registry = new Registry({ ctx, log, budgetBytes: 0, maxVersions: 10, threads: 2, files, ...overrides });
  made.push({ registry, ctx });
  return { registry, ctx, logs };
}

const SPECS = [
  { name: "a", dtype: "F32", shape: [32, 8] },
  { name: "b", dtype: "BF16", shape: [100] },
];

/**
 * A safetensors file in a fresh directory on tmpfs (/dev/shm) or on disk (the temp directory);
 * files of one version need tensor names of their own (`prefix`).
 */
function model(where: "tmpfs" | "disk" = "tmpfs", prefix = ""): string {
  const path = join(where === "tmpfs" ? tempDir("ckptd-test-", "/dev/shm") : tempDir(), "m.safetensors");
  writeSafetensors(
    path,
    SPECS.map((t) => ({ ...t, name: prefix + t.name })),
  );
  return path;
}

function request(name: string, files: string[], more: Partial<RegisterRequest> = {}): RegisterRequest {
  return { name, source: { files }, copy: false, adopt: false, ...more };
}

/** Registers and waits until it settles (ready or failed). */
async function settled(registry: Registry, req: RegisterRequest): Promise<CheckpointVersion> {
  const v = await registry.register(req);
  await v.done;
  return v;
}

async function ready(registry: Registry, req: RegisterRequest): Promise<CheckpointVersion> {
  const v = await settled(registry, req);
  expect(v.error).toBeUndefined();
  expect(v.state).toBe("ready");
  return v;
}

function ids(registry: Registry): string[] {
  return registry.list().map((v) => v.id);
}

/** A promise a hook can wait on until the test opens it. */
function gate() {
  let open: () => void = () => undefined;
  const opened = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { opened, open };
}

/** A hook holding back the calls on `path` (given as /proc/self/fd/N) until `g` opens. */
function holding(path: string, g: { opened: Promise<void> }) {
  return (fdPath: string) => (readlinkSync(fdPath) === path ? g.opened : undefined);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("checkName and parseRef", () => {
  it("accepts names of letters, digits, '.', '_' and '-' up to 128 characters", () => {
    for (const name of ["a", "Qwen2.5-7B_instruct", "0", "x".repeat(128)]) checkName(name);
    for (const name of ["", "-a", ".a", "a@1", "a/b", "a b", "x".repeat(129)]) {
      const err = thrown(() => checkName(name));
      expect(err.code).toBe("invalid_name");
      expect(err.message).toContain(`checkpoint name "${name}" must match`);
    }
  });

  it("splits name@N at the last '@'", () => {
    expect(parseRef("qwen")).toEqual({ name: "qwen" });
    expect(parseRef("qwen@1")).toEqual({ name: "qwen", version: 1 });
    expect(parseRef("qwen@12")).toEqual({ name: "qwen", version: 12 });
    expect(parseRef("qwen@9999999999")).toEqual({ name: "qwen", version: 9999999999 });
    expect(parseRef("a@b@3")).toEqual({ name: "a@b", version: 3 });
    expect(parseRef("@3")).toEqual({ name: "", version: 3 });
  });

  it("refuses a version that is not a positive integer", () => {
    for (const ref of ["qwen@", "qwen@0", "qwen@01", "qwen@-1", "qwen@1a", "qwen@a1", "qwen@1.5", "qwen@12345678901"]) {
      const err = thrown(() => parseRef(ref));
      expect(err.code).toBe("invalid_ref");
      expect(err.message).toBe(`"${ref}": version must be a positive integer`);
    }
  });
});

describe("CheckpointVersion", () => {
  const at = "2026-12-01T09:00:00.000Z";

  it("starts registering, with nothing pinned, no tensors and no files", () => {
    const v = new CheckpointVersion("m", 3, 100, at);
    expect(v.summary()).toEqual({
      id: "m@3",
      name: "m",
      version: 3,
      state: "registering",
      bytes: 100,
      tensorCount: 0,
      createdAt: at,
      inUse: false,
      origin: "files",
      progress: { bytesTotal: 100, bytesPinned: 0, bytesHashed: 0 },
    });
    expect(v.manifest()).toMatchObject({ files: [], tensors: [] });
    expect(v.pinned).toEqual([]);
  });

  it("reports timings and the error once it has them, and whether it is leased", () => {
    const v = new CheckpointVersion("m", 1, 100, at);
    v.timings = { pinSeconds: 0.5, hashSeconds: 0.25 };
    v.error = { code: "stale", message: "gone" };
    v.leases = 1;
    expect(v.summary()).toMatchObject({
      timings: { pinSeconds: 0.5, hashSeconds: 0.25 },
      error: { code: "stale", message: "gone" },
      inUse: true,
    });
  });

  it("turns stale only from ready, naming the file and why", () => {
    const v = new CheckpointVersion("m", 1, 100, at);
    v.markStale("/dev/shm/m.safetensors", "was removed");
    expect(v.state).toBe("registering");
    v.state = "ready";
    v.markStale("/dev/shm/m.safetensors", "was removed");
    expect(v.state).toBe("stale");
    expect(v.error).toEqual({
      code: "stale",
      message: "/dev/shm/m.safetensors was removed",
      details: { file: "/dev/shm/m.safetensors", reason: "was removed" },
    });
  });

  it("finished: the summary once ready, else why not, as a DaemonError", async () => {
    const v = new CheckpointVersion("m", 2, 100, at);
    await expect(v.finished()).rejects.toMatchObject({ code: "registration_failed", message: "m@2: registering" });
    v.state = "failed";
    v.error = { code: "over_budget", message: "too big", details: { bytes: 100 } };
    const err = await v.finished().catch((e) => e);
    expect(err).toBeInstanceOf(DaemonError);
    expect(err).toMatchObject({ code: "over_budget", message: "m@2: too big", details: { bytes: 100 } });
    v.state = "ready";
    expect(await v.finished()).toMatchObject({ id: "m@2", state: "ready" });
  });
});

describe("registering", () => {
  it("pins a tmpfs file in place and hashes every tensor", async () => {
    const { registry, ctx } = newRegistry();
    const path = model();
    const t0 = Date.now();
    const v = await ready(registry, request("m", [path]));
    const st = statSync(path);
    expect(v.id).toBe("m@1");
    expect(Date.parse(v.createdAt)).toBeGreaterThanOrEqual(t0 - 1000);
    expect(Date.parse(v.createdAt)).toBeLessThanOrEqual(Date.now());
    expect(v.files).toEqual([
      {
        path,
        size: st.size,
        mtimeMs: st.mtimeMs,
        ctimeMs: st.ctimeMs,
        ino: st.ino,
        dev: st.dev,
        inPlace: true,
        adopted: false,
      },
    ]);
    const bytes = readFileSync(path);
    const header = Number(bytes.readBigUInt64LE(0)) + 8;
    expect(v.tensors.map((t) => [t.name, t.dtype, t.shape, t.bytes, t.file, t.offset])).toEqual([
      ["a", "F32", [32, 8], 1024, 0, header],
      ["b", "BF16", [100], 200, 0, header + 1024],
    ]);
    expect(v.tensors[0]?.hash).toBe(await ckptHash(bytes.subarray(header, header + 1024)));
    expect(v.tensors[1]?.hash).toBe(await ckptHash(bytes.subarray(header + 1024)));
    expect(v.summary()).toMatchObject({ state: "ready", tensorCount: 2, inUse: false, bytes: st.size });
    expect(v.summary()).not.toHaveProperty("error");
    expect(v.progress).toEqual({ bytesTotal: st.size, bytesPinned: st.size, bytesHashed: st.size });
    expect([...ctx.live.values()].map((x) => x.kind)).toEqual(["map"]);
  });

  it("copies a file that is not on tmpfs, and one on tmpfs when asked to", async () => {
    const { registry, ctx } = newRegistry();
    const v = await ready(registry, request("m", [model("disk"), model("tmpfs", "2.")], { copy: true }));
    expect(v.files.map((f) => f.inPlace)).toEqual([false, false]);
    const w = await ready(registry, request("n", [model("disk"), model("tmpfs", "2.")]));
    expect(w.files.map((f) => f.inPlace)).toEqual([false, true]);
    expect([...ctx.live.values()].map((x) => x.kind).sort()).toEqual(["alloc", "alloc", "alloc", "map"]);
  });

  it("reports how long pinning and hashing took", async () => {
    const { registry, ctx } = newRegistry();
    ctx.before.fileMap = () => sleep(120);
    ctx.before.hash = () => sleep(120);
    const t0 = performance.now();
    const v = await ready(registry, request("m", [model()]));
    const wall = (performance.now() - t0) / 1000;
    const timings = v.summary().timings;
    expect(timings?.pinSeconds).toBeGreaterThanOrEqual(0.1);
    expect(timings?.hashSeconds).toBeGreaterThanOrEqual(0.1);
    expect((timings?.pinSeconds ?? 0) + (timings?.hashSeconds ?? 0)).toBeLessThanOrEqual(wall);
  });

  it("hashes each file while the next one pins, and unpins only once no hash reads", async () => {
    const { registry, ctx } = newRegistry();
    const calls: string[] = [];
    ctx.before.fileMap = async () => {
      calls.push("map");
      await sleep(60);
    };
    ctx.before.hash = async () => {
      calls.push("hash");
      await sleep(60);
    };
    await ready(registry, request("m", [model(), model("tmpfs", "2.")]));
    expect(calls).toEqual(["map", "hash", "map", "hash"]); // the first hash before the second map
    // A second file that fails to pin: the first one's hash ends before anything is unpinned.
    let hashing = false;
    ctx.before.hash = async () => {
      hashing = true;
      await sleep(100);
      hashing = false;
    };
    let mapped = 0;
    ctx.before.fileMap = () => {
      if (++mapped === 2) throw new Error("no room");
    };
    let unmappedWhileHashing = false;
    ctx.before.fileUnmap = () => {
      unmappedWhileHashing ||= hashing;
    };
    const v = await settled(registry, request("n", [model(), model("tmpfs", "2.")]));
    expect(v.error).toEqual({ code: "registration_failed", message: "no room" });
    expect(unmappedWhileHashing).toBe(false);
    expect([...ctx.live.values()].filter((x) => x.kind === "map")).toHaveLength(2); // m's two files only
  });

  it("fails cleanly when a file's hash fails while the one before it pins, and maps no more", async () => {
    const { registry, ctx } = newRegistry();
    let maps = 0;
    let hashes = 0;
    let pinning = false;
    let failedWhilePinning = false;
    ctx.before.fileMap = () => void maps++;
    ctx.before.hostRegister = async () => {
      pinning = true;
      await sleep(100);
      pinning = false;
    };
    ctx.before.hash = () => {
      if (++hashes < 2) return;
      failedWhilePinning = pinning;
      throw new Error("hash broke");
    };
    let unmappedWhilePinning = false;
    ctx.before.fileUnmap = () => {
      unmappedWhilePinning ||= pinning;
    };
    const v = await settled(registry, request("m", [model(), model("tmpfs", "2."), model("tmpfs", "3.")]));
    expect(v.error).toEqual({ code: "registration_failed", message: "hash broke" });
    expect(failedWhilePinning).toBe(true);
    expect(unmappedWhilePinning).toBe(false);
    expect(maps).toBe(2);
    expect(ctx.live.size).toBe(0); // the first file's pinning ended before it was released
    expect(ctx.registered.size).toBe(0);
  });

  it("hashes a file in place before pinning it, so that pinning finds its pages mapped", async () => {
    const { registry, ctx } = newRegistry();
    const order: string[] = [];
    ctx.before.hash = () => void order.push("hash");
    ctx.before.hostRegister = () => void order.push("pin");
    await settled(registry, request("m", [model(), model("tmpfs", "2.")]));
    // File 2 hashes while file 1 pins: the calls start in this order.
    expect(order).toEqual(["hash", "pin", "hash", "pin"]);
  });

  it("works without an onChange callback", async () => {
    const { registry } = newRegistry();
    const v = await registry.register(request("m", [model()]));
    await expect(v.done).resolves.toBeUndefined();
    await expect(v.finished()).resolves.toMatchObject({ id: "m@1", state: "ready" });
    expect((await registry.delete("m")).map((x) => x.id)).toEqual(["m@1"]);
  });

  it("calls onChange when it takes a number and once ready, and only logs its failure", async () => {
    const saves: string[][] = [];
    const { registry, logs } = newRegistry({
      onChange: async (r) => {
        saves.push(ids(r));
        throw new Error("disk full");
      },
    });
    const v = await ready(registry, request("m", [model()]));
    expect(saves).toEqual([["m@1"], ["m@1"]]);
    expect(logs).toContainEqual(
      expect.objectContaining({
        level: 50,
        msg: "saving the registry",
        err: expect.objectContaining({ message: "disk full" }),
      }),
    );
    expect(v.state).toBe("ready");
  });

  it("records a failure with its code, releasing what it pinned", async () => {
    const { registry, ctx } = newRegistry();
    ctx.before.hash = () => {
      throw new Error("boom");
    };
    const v = await settled(registry, request("m", [model(), model("disk", "2.")]));
    expect(v.state).toBe("failed");
    expect(v.error).toEqual({ code: "registration_failed", message: "boom" });
    expect(v.summary().error).toEqual({ code: "registration_failed", message: "boom" });
    expect(v.pinned).toEqual([]);
    expect(ctx.live.size).toBe(0);
    expect(ctx.registered.size).toBe(0);
    await expect(v.finished()).rejects.toMatchObject({ code: "registration_failed", message: "m@1: boom" });
  });

  it("logs a failure to release a failed registration's memory", async () => {
    const { registry, ctx, logs } = newRegistry();
    ctx.before.hash = () => {
      throw new Error("boom");
    };
    ctx.before.fileUnmap = () => {
      throw new Error("cannot unmap");
    };
    const v = await settled(registry, request("m", [model()]));
    expect(v.error).toEqual({ code: "registration_failed", message: "boom" });
    expect(logs).toContainEqual(
      expect.objectContaining({
        level: 50,
        msg: "unpinning a failed registration",
        err: expect.objectContaining({ message: "cannot unmap" }),
      }),
    );
  });

  it("checks the whole request before anything is pinned", async () => {
    const { registry, ctx } = newRegistry();
    const err = await registry
      .register(request("m", [model(), join(tempDir(), "missing.safetensors")]))
      .catch((e) => e);
    expect(err.code).toBe("ENOENT");
    await expect(registry.register(request("m/x", [model()]))).rejects.toMatchObject({ code: "invalid_name" });
    expect(ids(registry)).toEqual([]);
    expect(ctx.live.size).toBe(0);
  });
});

describe("the pinned-memory budget", () => {
  it("takes a version that fits exactly and refuses one more byte", async () => {
    const path = model();
    const size = statSync(path).size;
    const { registry } = newRegistry({ budgetBytes: size });
    expect(registry.budgetLeft()).toBe(size);
    await ready(registry, request("m", [path]));
    expect(registry.pinnedBytes()).toBe(size);
    expect(registry.budgetLeft()).toBe(0);
    const err = await registry.register(request("n", [model()])).catch((e) => e);
    expect(err.code).toBe("over_budget");
    expect(err.message).toBe(
      `registering ${size} bytes would exceed the pinned-memory budget of ${size} bytes by ${size} bytes (${size} in use)`,
    );
    expect(err.details).toEqual({ bytes: size, budgetBytes: size, usedBytes: size, overBytes: size });
    expect(ids(registry)).toEqual(["m@1"]);
    // A version an engine holds is why there is no room: the refusal names the holder.
    registry.holders = (id) => (id === "m@1" ? ["receiver engine-0 (pid 7, GPU 0)"] : []);
    const held = await registry.register(request("n", [model()])).catch((e) => e);
    expect(held.message).toMatch(
      /\(\d+ in use; m@1 is held by receiver engine-0 \(pid 7, GPU 0\) and is kept while it is\)$/,
    );
    expect(held.details.held).toEqual([{ id: "m@1", by: ["receiver engine-0 (pid 7, GPU 0)"] }]);
  });

  it("has no limit when the budget is 0", async () => {
    const { registry } = newRegistry({ budgetBytes: 0 });
    expect(registry.budgetLeft()).toBe(Number.POSITIVE_INFINITY);
    await ready(registry, request("m", [model()]));
    expect(() => registry.checkBudget(2 ** 50, "uploading")).not.toThrow();
    expect(registry.budgetLeft()).toBe(Number.POSITIVE_INFINITY);
  });

  it("counts registering versions but not failed ones", async () => {
    const path = model();
    const size = statSync(path).size;
    const { registry, ctx } = newRegistry({ budgetBytes: size });
    ctx.before.hash = () => {
      throw new Error("boom");
    };
    const failed = await settled(registry, request("m", [path]));
    expect(failed.state).toBe("failed");
    expect(registry.pinnedBytes()).toBe(0);
    ctx.before.hash = undefined;
    const g = gate();
    ctx.before.fileMap = holding(path, g);
    const pending = await registry.register(request("m", [path]));
    expect(registry.pinnedBytes()).toBe(size);
    expect(() => registry.checkBudget(1)).toThrow(/exceed the pinned-memory budget/);
    g.open();
    await pending.done;
    expect(pending.state).toBe("ready");
  });
});

describe("looking versions up", () => {
  it("lists versions by name, then by number", async () => {
    const { registry } = newRegistry();
    const path = model();
    const x = await ready(registry, request("x", [path]));
    const saved = { createdAt: x.createdAt, files: x.files, tensors: x.tensors };
    await ready(registry, request("b", [path]));
    await ready(registry, request("a", [path]));
    await ready(registry, request("b", [path]));
    // Restored out of order: numbers need not arrive ascending.
    await ready(registry, request("c", [path], { restore: { version: 7, ...saved } }));
    await ready(registry, request("c", [path], { restore: { version: 2, ...saved } }));
    expect(ids(registry)).toEqual(["a@1", "b@1", "b@2", "c@2", "c@7", "x@1"]);
  });

  it("gets the newest ready version by name, any version by number, and 404s naming what is missing", async () => {
    const { registry, ctx } = newRegistry();
    const path = model();
    const first = await ready(registry, request("m", [path]));
    ctx.before.hash = () => {
      throw new Error("boom");
    };
    const failed = await settled(registry, request("m", [path]));
    ctx.before.hash = undefined;
    expect(registry.get("m")).toBe(first);
    expect(registry.get("m@2")).toBe(failed);
    expect(registry.get("m", ["ready", "failed"])).toBe(failed);
    const missing = thrown(() => registry.get("m@3"));
    expect(missing).toMatchObject({ code: "not_found", message: "no checkpoint m@3" });
    const none = thrown(() => registry.get("n"));
    expect(none).toMatchObject({ code: "not_found", message: 'no ready version of checkpoint "n"' });
  });

  it("keeps version numbers across restarts and never lowers them", async () => {
    const { registry } = newRegistry();
    registry.setNextVersions({ m: 5 });
    expect(registry.nextVersions()).toEqual({ m: 5 });
    expect((await ready(registry, request("m", [model()]))).id).toBe("m@5");
    expect(registry.nextVersions()).toEqual({ m: 6 });
    registry.setNextVersions({ m: 2, n: 3 });
    expect(registry.nextVersions()).toEqual({ m: 6, n: 3 });
    expect((await ready(registry, request("m", [model()]))).id).toBe("m@6");
  });
});

describe("leases", () => {
  it("marks a version in use until released, and a second release does nothing", async () => {
    const { registry } = newRegistry();
    await ready(registry, request("m", [model()]));
    const first = registry.acquire("m");
    expect(first.version.summary().inUse).toBe(true);
    first.release();
    expect(registry.get("m").summary().inUse).toBe(false);
    first.release();
    const second = registry.acquire("m@1");
    expect(registry.get("m").summary().inUse).toBe(true);
    await expect(registry.delete("m")).rejects.toMatchObject({
      code: "in_use",
      message: "m@1 is in use (by an update, or a pull or push copying from it)",
    });
    second.release();
    expect((await registry.delete("m")).map((v) => v.id)).toEqual(["m@1"]);
  });

  it("refuses a version still registering, or being deleted", async () => {
    const { registry, ctx } = newRegistry();
    const slow = model();
    const g = gate();
    ctx.before.fileMap = holding(slow, g);
    const pending = await registry.register(request("m", [slow]));
    const err = thrown(() => registry.acquire("m@1"));
    expect(err).toMatchObject({ code: "not_ready", message: "m@1 is registering" });
    expect(thrown(() => registry.acquire("m"))).toMatchObject({ code: "not_found" });
    await ready(registry, request("m", [model()]));
    // Deleting both waits for the first to be cancelled; the second cannot be leased meanwhile.
    const deleting = registry.delete("m");
    expect(thrown(() => registry.acquire("m@2"))).toMatchObject({ code: "not_ready", message: "m@2 is being deleted" });
    await expect(registry.delete("m@2")).rejects.toMatchObject({
      code: "in_use",
      message: "m@2 is in use (by an update, or a pull or push copying from it)",
    });
    g.open();
    expect((await deleting).map((v) => v.id)).toEqual(["m@1", "m@2"]);
    expect(pending.state).toBe("failed");
    expect(pending.error?.code).toBe("cancelled");
    expect(ctx.live.size).toBe(0);
  });
});

describe("restoring a saved version", () => {
  /** A file registered and deleted (so the saved records are real), with its mtime on a whole second. */
  async function saved(registry: Registry, where: "tmpfs" | "disk" = "tmpfs") {
    const path = model(where);
    utimesSync(path, 1_700_000_000, 1_700_000_000);
    const v = await ready(registry, request("tmp", [path]));
    await registry.delete("tmp");
    return { path, files: v.files, tensors: v.tensors };
  }

  const createdAt = "2025-01-02T03:04:05.000Z";

  it("keeps the saved number and creation time when every file and hash is unchanged", async () => {
    const { registry } = newRegistry();
    const { path, files, tensors } = await saved(registry);
    const v = await ready(registry, request("m", [path], { restore: { version: 4, createdAt, files, tensors } }));
    expect(v.id).toBe("m@4");
    expect(v.createdAt).toBe(createdAt);
    expect(v.tensors).toEqual(tensors);
    expect(registry.nextVersions().m).toBe(5);
  });

  it("allows the mtime to differ by up to a millisecond (Node and Deno round differently)", async () => {
    const { registry } = newRegistry();
    const { path, files, tensors } = await saved(registry);
    const near = files.map((f) => ({ ...f, mtimeMs: f.mtimeMs + 0.9 }));
    await ready(registry, request("m", [path], { restore: { version: 1, createdAt, files: near, tensors } }));
    const far = files.map((f) => ({ ...f, mtimeMs: f.mtimeMs + 1.5 }));
    const err = await registry
      .register(request("m", [path], { restore: { version: 2, createdAt, files: far, tensors } }))
      .catch((e) => e);
    expect(err.message).toBe(`${path} changed since it was registered (size or modification time)`);
  });

  it("refuses before pinning when the files are not the saved ones", async () => {
    const { registry, ctx } = newRegistry();
    const { path, files, tensors } = await saved(registry);
    const restore = (f: FileRecord[]) => ({ version: 1, createdAt, files: f, tensors });
    const other = join(tempDir("ckptd-test-", "/dev/shm"), "m.safetensors");
    copyFileSync(path, other);
    utimesSync(other, 1_700_000_000, 1_700_000_000);
    const more = join(tempDir(), "more.safetensors");
    writeSafetensors(more, [{ name: "c", dtype: "F32", shape: [4] }]);
    const cases: [string[], FileRecord[], string][] = [
      [[path, more], files, "the set of files changed"],
      [[path], files.map((f) => ({ ...f, size: f.size + 1 })), `${path} changed since it was registered`],
      [[other], files, `${other} changed since it was registered`],
    ];
    for (const [paths, records, why] of cases) {
      const err = await registry.register(request("m", paths, { restore: restore(records) })).catch((e) => e);
      expect(err).toBeInstanceOf(Error);
      expect(err.message).toContain(why);
    }
    expect(ids(registry)).toEqual([]);
    expect(ctx.live.size).toBe(0);
  });

  it("fails, releasing everything, when a tensor's hash or the set of tensors changed", async () => {
    const { registry, ctx } = newRegistry();
    const { path, files, tensors } = await saved(registry);
    const cases: [TensorRecord[], string][] = [
      [tensors.map((t, i) => (i === 1 ? { ...t, hash: "0000000000000000" } : t)), 'tensor "b" no longer has the hash'],
      [[...tensors, { ...(tensors[0] as TensorRecord), name: "c" }], "the set of tensors changed"],
    ];
    for (const [records, why] of cases) {
      const restore = { version: 1, createdAt, files, tensors: records };
      const v = await settled(registry, request("m", [path], { restore }));
      expect(v.state).toBe("failed");
      expect(v.error?.code).toBe("registration_failed");
      expect(v.error?.message).toContain(why);
      await registry.delete("m@1");
    }
    expect(ctx.live.size).toBe(0);
  });
});

describe("keeping maxVersions", () => {
  it("drops the oldest unused versions, deleting the files it adopted", async () => {
    const { registry, ctx } = newRegistry({ maxVersions: 1 });
    const adopted = model();
    const kept = model();
    await ready(registry, request("m", [adopted], { adopt: true }));
    await ready(registry, request("m", [kept]));
    expect(ids(registry)).toEqual(["m@2"]);
    expect(existsSync(adopted)).toBe(false);
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@3"]);
    expect(existsSync(kept)).toBe(true);
    expect(ctx.live.size).toBe(1);
  });

  it("keeps a leased version, and does not count one still registering", async () => {
    const { registry, ctx } = newRegistry({ maxVersions: 2 });
    await ready(registry, request("m", [model()]));
    const slow = model();
    const g = gate();
    ctx.before.fileMap = holding(slow, g);
    const pending = await registry.register(request("m", [slow]));
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@1", "m@2", "m@3"]);
    const lease = registry.acquire("m@1");
    g.open();
    await pending.done;
    // Now three are ready: the newest two stay, and so does the leased one older than them.
    expect(ids(registry)).toEqual(["m@1", "m@2", "m@3"]);
    lease.release();
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@3", "m@4"]);
  });

  it("never drops the version just made ready to keep a leased older one (maxVersions 1)", async () => {
    const { registry } = newRegistry({ maxVersions: 1 });
    await ready(registry, request("m", [model()]));
    const lease = registry.acquire("m@1"); // an update (or a push on it as a base) uses m@1
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@1", "m@2"]);
    lease.release();
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@3"]);
  });

  it("counts stale versions", async () => {
    const { registry } = newRegistry({ maxVersions: 1 });
    const path = model();
    await ready(registry, request("m", [path]));
    utimesSync(path, 1_600_000_000, 1_600_000_000);
    expect(thrown(() => registry.acquire("m"))).toMatchObject({ code: "stale" });
    expect(registry.get("m@1").state).toBe("stale");
    await ready(registry, request("m", [model()]));
    expect(ids(registry)).toEqual(["m@2"]);
  });

  it("only logs a failure to drop an old version", async () => {
    const { registry, ctx, logs } = newRegistry({ maxVersions: 1 });
    const old = await ready(registry, request("m", [model()]));
    const address = old.pinned[0]?.mem.address;
    ctx.before.fileUnmap = (mem: HostMemory) => {
      if (mem.address === address) throw new Error("cannot unmap");
    };
    const v = await ready(registry, request("m", [model()]));
    expect(v.state).toBe("ready");
    expect(logs).toContainEqual(
      expect.objectContaining({
        level: 50,
        msg: "dropping old versions",
        err: expect.objectContaining({ message: "cannot unmap" }),
      }),
    );
  });
});

describe("deleting", () => {
  it("deletes one version by number, or all by name, and 404s on what is not there", async () => {
    const saves: string[][] = [];
    const { registry, ctx } = newRegistry({ onChange: async (r) => void saves.push(ids(r)) });
    const adopted = model();
    const mine = model();
    await ready(registry, request("m", [adopted], { adopt: true }));
    await ready(registry, request("m", [mine]));
    await ready(registry, request("m", [model()]));
    saves.length = 0;
    expect((await registry.delete("m@1")).map((v) => v.id)).toEqual(["m@1"]);
    expect(ids(registry)).toEqual(["m@2", "m@3"]);
    expect(existsSync(adopted)).toBe(false);
    expect(saves).toEqual([["m@2", "m@3"]]);
    expect((await registry.delete("m")).map((v) => v.id)).toEqual(["m@2", "m@3"]);
    expect(existsSync(mine)).toBe(true);
    expect(ids(registry)).toEqual([]);
    expect(ctx.live.size).toBe(0);
    await expect(registry.delete("m")).rejects.toMatchObject({ code: "not_found", message: 'no checkpoint "m"' });
    await expect(registry.delete("m@9")).rejects.toMatchObject({ code: "not_found", message: "no checkpoint m@9" });
  });

  it("leaves an adopted file's path alone once another file took it", async () => {
    const { registry } = newRegistry();
    const path = model();
    await ready(registry, request("m", [path], { adopt: true }));
    const other = `${path}.new`;
    copyFileSync(path, other);
    renameSync(other, path);
    await registry.delete("m");
    expect(existsSync(path)).toBe(true);
  });

  it("cancels a registration still pinning", async () => {
    const { registry, ctx } = newRegistry();
    const slow = model();
    const g = gate();
    ctx.before.fileMap = holding(slow, g);
    const pending = await registry.register(request("m", [slow]));
    const deleting = registry.delete("m@1");
    g.open();
    expect((await deleting).map((v) => v.id)).toEqual(["m@1"]);
    await expect(pending.finished()).rejects.toMatchObject({ code: "cancelled" });
    expect(ids(registry)).toEqual([]);
    expect(ctx.live.size).toBe(0);
  });

  it("cancels a registration still hashing: the waiting caller is told, nothing is saved", async () => {
    const saves: string[][] = [];
    const { registry, ctx } = newRegistry({ onChange: async (r) => void saves.push(ids(r)) });
    let deleting: Promise<CheckpointVersion[]> | undefined;
    ctx.before.hash = () => {
      deleting = registry.delete("m@1");
    };
    const pending = await registry.register(request("m", [model()]));
    await pending.done;
    expect((await deleting)?.map((v) => v.id)).toEqual(["m@1"]);
    await expect(pending.finished()).rejects.toMatchObject({
      code: "cancelled",
      message: "m@1: registration was cancelled",
    });
    expect(saves).toEqual([["m@1"], []]);
    expect(ctx.live.size).toBe(0);
  });
});

describe("closing", () => {
  it("cancels what is registering and releases everything", async () => {
    const { registry, ctx } = newRegistry();
    await ready(registry, request("m", [model()]));
    await ready(registry, request("n", [model("disk")]));
    const slow = model();
    const g = gate();
    ctx.before.fileMap = holding(slow, g);
    const pending = await registry.register(request("o", [slow]));
    const closing = registry.close();
    g.open();
    await closing;
    expect(pending.error?.code).toBe("cancelled");
    expect(ids(registry)).toEqual([]);
    expect(ctx.live.size).toBe(0);
    expect(ctx.registered.size).toBe(0);
  });
});

describe("the pinned pool", () => {
  it("gives a dropped copy's pinned memory to the next version of its size, pinning nothing new", async () => {
    const { registry, ctx } = newRegistry();
    let allocated = 0;
    ctx.before.hostAlloc = () => {
      allocated++;
    };
    const first = await ready(registry, request("m", [model("disk")], { copy: true }));
    const allocs = () => allocated;
    const before = allocs();
    await registry.delete(first.id);
    expect(registry.pool.status()).toMatchObject({ blocks: 1, bytes: expect.any(Number), fresh: 1 });
    expect(registry.pool.bytes()).toBeGreaterThanOrEqual(first.bytes);
    const second = await ready(registry, request("m", [model("disk", "x.")], { copy: true }));
    expect(allocs()).toBe(before); // reused: no allocation
    expect(registry.pool.status()).toMatchObject({ blocks: 0, bytes: 0, reused: 1 });
    expect(second.pinned[0]?.mem.len).toBe(second.bytes);
    const bytes = Buffer.from(second.pinned[0]?.mem.view() as Uint8Array);
    expect(bytes.subarray(8).toString()).toContain('"x.'); // the new file's bytes, not the old ones
  });

  it("unpins pooled memory when a version needs the room under the budget", async () => {
    const probe = newRegistry();
    const size = (await ready(probe.registry, request("p", [model("disk")], { copy: true }))).bytes;
    const { registry, ctx } = newRegistry({ budgetBytes: size + 1000 });
    let freed = 0;
    ctx.before.hostFree = () => {
      freed++;
    };
    const first = await ready(registry, request("m", [model("disk")], { copy: true }));
    await registry.delete(first.id);
    expect(registry.pool.bytes()).toBe(size);
    expect(freed).toBe(0);
    // in place (no block from the pool): the pool is trimmed to make room
    await ready(registry, request("n", [model("tmpfs")]));
    expect(registry.pool.bytes()).toBe(0);
    expect(freed).toBe(1);
  });

  it("does not unpin the block a copy of the same size will take, even under a tight budget", async () => {
    const probe = newRegistry();
    const size = (await ready(probe.registry, request("p", [model("disk")], { copy: true }))).bytes;
    const { registry, ctx } = newRegistry({ budgetBytes: size + 1000 });
    let freed = 0;
    let allocated = 0;
    ctx.before.hostFree = () => {
      freed++;
    };
    ctx.before.hostAlloc = () => {
      allocated++;
    };
    const first = await ready(registry, request("m", [model("disk")], { copy: true }));
    await registry.delete(first.id);
    await ready(registry, request("m", [model("disk", "y.")], { copy: true }));
    expect({ allocated, freed }).toEqual({ allocated: 1, freed: 0 });
    expect(registry.pool.status()).toMatchObject({ reused: 1, fresh: 1 });
  });

  it("lets no two registrations arriving together take the same room in the budget", async () => {
    const probe = newRegistry();
    const size = (await ready(probe.registry, request("p", [model("tmpfs")]))).bytes;
    const { registry } = newRegistry({ budgetBytes: size * 2 - 1 });
    const both = await Promise.allSettled([
      registry.register(request("a", [model("tmpfs")])),
      registry.register(request("b", [model("tmpfs")])),
    ]);
    expect(both.map((r) => r.status).sort()).toEqual(["fulfilled", "rejected"]);
    expect((both.find((r) => r.status === "rejected") as PromiseRejectedResult).reason.code).toBe("over_budget");
    for (const v of registry.list()) await v.done;
    expect(registry.pinnedBytes()).toBeLessThanOrEqual(size * 2 - 1);
  });

  it("keeps nothing of a failed registration, not even in the pool", async () => {
    const { registry, ctx } = newRegistry();
    ctx.before.fileReadHash = () => {
      throw new Error("boom");
    };
    const v = await settled(registry, request("m", [model("disk")], { copy: true }));
    expect(v.state).toBe("failed");
    expect(registry.pool.bytes()).toBe(0);
    expect(ctx.live.size).toBe(0);
  });
});
