import {
  appendFileSync,
  closeSync,
  copyFileSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  statSync,
  unlinkSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Context, type HostMemory, openBackend } from "../../ffi/index.ts";
import { ckptHash, safetensorsBytes, writeSafetensors } from "../../test/checkpoint-files.ts";
import { tempDir } from "../../test/helpers.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import {
  hashTensors,
  type InspectedFile,
  inspectFile,
  type PinnedFile,
  type PinOptions,
  pinFiles,
  readPieces,
  unpinFiles,
} from "./pin.ts";

/** The real host context, recording what is mapped, allocated and registered, with failures on demand. */
class SpyContext extends Context {
  readonly calls: { method: string; args: unknown[] }[] = [];
  /** Mappings and allocations not yet released, by address. */
  readonly live = new Map<bigint, { kind: "map" | "alloc"; mem: HostMemory }>();
  readonly registered = new Set<bigint>();
  /** Runs before the real call; throwing fails the call without making it. */
  readonly before: Record<string, ((...args: never[]) => unknown) | undefined> = {};

  constructor(real: Context) {
    super(real.lib, real.ptr);
  }

  private async hook(method: string, args: unknown[]): Promise<void> {
    this.calls.push({ method, args });
    await this.before[method]?.(...(args as never[]));
  }

  called(method: string): unknown[][] {
    return this.calls.filter((c) => c.method === method).map((c) => c.args);
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
    await this.hook("hostRegister", [address, len, readonly]);
    const mem = await super.hostRegister(address, len, readonly);
    this.registered.add(address);
    return mem;
  }

  override async hostUnregister(mem: HostMemory): Promise<void> {
    await this.hook("hostUnregister", [mem]);
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

  override async hostRead(mem: HostMemory, len: number, offset = 0): Promise<Uint8Array> {
    await this.hook("hostRead", [mem, len, offset]);
    return super.hostRead(mem, len, offset);
  }
}

let real: Context;

beforeAll(async () => {
  real = (await openBackend("host", LIB_DIR)).context;
});

afterAll(async () => {
  await real.destroy();
});

const SPECS = [
  { name: "a", dtype: "F32", shape: [64, 16] },
  { name: "b", dtype: "BF16", shape: [300] },
];

/** A safetensors file in a fresh directory on tmpfs (/dev/shm) or on disk (the temp directory). */
function checkpoint(where: "tmpfs" | "disk", name = "m.safetensors"): string {
  const dir = where === "tmpfs" ? tempDir("ckptd-test-", "/dev/shm") : tempDir();
  const path = join(dir, name);
  writeSafetensors(path, SPECS);
  return path;
}

function options(overrides: Partial<PinOptions> = {}): PinOptions {
  return {
    copy: false,
    threads: 2,
    signal: new AbortController().signal,
    progress: { bytesTotal: 0, bytesPinned: 0, bytesHashed: 0 },
    ...overrides,
  };
}

function openFds(): number {
  return readdirSync("/proc/self/fd").length;
}

/**
 * Runs `fn` on a fresh spy; fails unless it leaves `left` mappings or allocations (none by
 * default), and releases those in any case.
 */
async function withSpy(fn: (ctx: SpyContext) => Promise<void>, left = 0): Promise<void> {
  const ctx = new SpyContext(real);
  try {
    await fn(ctx);
    expect(ctx.live.size).toBe(left);
  } finally {
    for (const { kind, mem } of ctx.live.values()) {
      if (ctx.registered.has(mem.address)) await real.hostUnregister(mem).catch(() => undefined);
      await (kind === "map" ? real.fileUnmap(mem) : real.hostFree(mem)).catch(() => undefined);
    }
  }
}

describe("inspectFile", () => {
  it("reads the header, size, inode and whether the file is on tmpfs", async () => {
    for (const [where, tmpfs] of [
      ["tmpfs", true],
      ["disk", false],
    ] as const) {
      const path = checkpoint(where);
      const st = statSync(path);
      const f = await inspectFile(path);
      expect(f).toMatchObject({ path, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, dev: st.dev, tmpfs });
      expect(f.header.tensors.map((t) => t.name)).toEqual(["a", "b"]);
      expect(Buffer.from(f.prefix)).toEqual(readFileSync(path).subarray(0, f.header.dataStart));
    }
  });

  it("checks the open file through its descriptor path", async () => {
    const path = checkpoint("tmpfs");
    const seen: string[] = [];
    await inspectFile(path, async (fdPath) => {
      seen.push(fdPath);
    });
    expect(seen).toHaveLength(1);
    expect(seen[0]).toMatch(/^\/proc\/self\/fd\/\d+$/);
  });

  it("refuses what the confine check refuses, before reading", async () => {
    const path = checkpoint("tmpfs");
    const refused = new Error("outside every root");
    await expect(inspectFile(path, () => Promise.reject(refused))).rejects.toBe(refused);
  });

  it("judges a file it cannot statfs by its path: /dev/shm is tmpfs, elsewhere is not", async () => {
    // Removed once open: statfs on the path then fails, the open descriptor still reads.
    const unlinkOnOpen = (path: string) => async () => unlinkSync(path);
    const shm = checkpoint("tmpfs");
    expect((await inspectFile(shm, unlinkOnOpen(shm))).tmpfs).toBe(true);
    const disk = checkpoint("disk");
    expect((await inspectFile(disk, unlinkOnOpen(disk))).tmpfs).toBe(false);
  });

  it("reports a broken header as invalid_safetensors naming the file and the rule", async () => {
    const path = join(tempDir(), "bad.safetensors");
    appendFileSync(path, safetensorsBytes({ a: { dtype: "F32", shape: [2], data_offsets: [0, 4] } }, 8));
    const err = await inspectFile(path).catch((e) => e);
    expect(err.code).toBe("invalid_safetensors");
    expect(err.details).toMatchObject({ file: path, tensor: "a" });
    expect(err.message).toContain(path);
  });

  it("passes other failures on as they are (a directory is not a header error)", async () => {
    const dir = join(tempDir(), "a.safetensors");
    mkdirSync(dir);
    const err = await inspectFile(dir).catch((e) => e);
    expect(err.code).toBe("EISDIR");
  });

  it("closes the file it opened, whether the header is good or not", async () => {
    const good = checkpoint("disk");
    const bad = join(tempDir(), "bad.safetensors");
    appendFileSync(bad, new Uint8Array(4));
    const before = openFds();
    for (let i = 0; i < 5; i++) {
      await inspectFile(good);
      await inspectFile(bad).catch(() => undefined);
    }
    expect(openFds()).toBe(before);
  });
});

describe("pinFiles", () => {
  it("maps a tmpfs file in place and registers the mapping read-only", async () => {
    await withSpy(async (ctx) => {
      const path = checkpoint("tmpfs");
      const file = await inspectFile(path);
      const progress = { bytesTotal: file.size, bytesPinned: 0, bytesHashed: 0 };
      const [p] = await pinFiles(ctx, [file], options({ progress }));
      expect(p).toMatchObject({ path, size: file.size, mtimeMs: file.mtimeMs, inPlace: true });
      expect(ctx.called("hostAlloc")).toEqual([]);
      expect(ctx.called("hostRegister")).toEqual([[p?.mem.address, file.size, true]]);
      expect(ctx.registered.has(p?.mem.address as bigint)).toBe(true);
      expect(progress.bytesPinned).toBe(file.size);
      expect(Buffer.from(p?.mem.view() as Uint8Array)).toEqual(readFileSync(path));
      await unpinFiles(ctx, p ? [p] : []);
      expect(ctx.registered.size).toBe(0);
    });
  });

  it("copies into pinned memory when asked to, or when the file is not on tmpfs", async () => {
    await withSpy(async (ctx) => {
      const cases = [
        [checkpoint("tmpfs"), true],
        [checkpoint("disk"), false],
        [checkpoint("disk"), true],
      ] as const;
      for (const [path, copy] of cases) {
        const file = await inspectFile(path);
        const progress = { bytesTotal: file.size, bytesPinned: 0, bytesHashed: 0 };
        const pinned = await pinFiles(ctx, [file], options({ copy, progress }));
        expect(pinned[0]?.inPlace).toBe(false);
        expect(Buffer.from(pinned[0]?.mem.view() as Uint8Array)).toEqual(readFileSync(path));
        expect(progress.bytesPinned).toBe(file.size);
        await unpinFiles(ctx, pinned);
      }
      expect(ctx.called("fileMap")).toEqual([]);
      expect(ctx.called("hostAlloc")).toHaveLength(3);
    });
  });

  it("pins several files in order, progress adding up to their sizes", async () => {
    await withSpy(async (ctx) => {
      const files = [await inspectFile(checkpoint("tmpfs")), await inspectFile(checkpoint("disk"))];
      const total = files.reduce((n, f) => n + f.size, 0);
      const progress = { bytesTotal: total, bytesPinned: 0, bytesHashed: 0 };
      const pinned = await pinFiles(ctx, files, options({ progress }));
      expect(pinned.map((p) => [p.path, p.inPlace])).toEqual([
        [files[0]?.path, true],
        [files[1]?.path, false],
      ]);
      expect(progress.bytesPinned).toBe(total);
      await unpinFiles(ctx, pinned);
    });
  });

  it("pins nothing once cancelled", async () => {
    await withSpy(async (ctx) => {
      const file = await inspectFile(checkpoint("tmpfs"));
      const abort = new AbortController();
      abort.abort();
      const err = await pinFiles(ctx, [file], options({ signal: abort.signal })).catch((e) => e);
      expect(err).toMatchObject({ code: "cancelled", message: "registration was cancelled" });
      expect(ctx.called("fileMap")).toEqual([]);
    });
  });

  it("releases the files already pinned when cancelled between files", async () => {
    await withSpy(async (ctx) => {
      const files = [await inspectFile(checkpoint("tmpfs")), await inspectFile(checkpoint("disk"))];
      const abort = new AbortController();
      ctx.before.hostRead = () => abort.abort();
      const err = await pinFiles(ctx, files, options({ signal: abort.signal })).catch((e) => e);
      expect(err.code).toBe("cancelled");
      expect(ctx.called("fileMap")).toHaveLength(1);
      expect(ctx.called("hostAlloc")).toEqual([]);
      expect(ctx.registered.size).toBe(0);
    });
  });

  it("refuses a file that grew between inspection and pinning, leaving nothing mapped", async () => {
    await withSpy(async (ctx) => {
      const path = checkpoint("tmpfs");
      const file = await inspectFile(path);
      const confine = async () => appendFileSync(path, new Uint8Array(64));
      const err = await pinFiles(ctx, [file], options({ confine })).catch((e) => e);
      expect(err.message).toBe(`${path} changed size while registering`);
      expect(ctx.registered.size).toBe(0);
    });
  });

  it("refuses a file whose header was rewritten between inspection and pinning", async () => {
    for (const copy of [false, true]) {
      await withSpy(async (ctx) => {
        const path = checkpoint("tmpfs");
        const file = await inspectFile(path);
        const rewrite = async () => {
          const fd = openSync(path, "r+");
          // The first tensor's name, same length: the size stays, the header is another.
          const at = Buffer.from(file.prefix).indexOf('"a"');
          writeSync(fd, Buffer.from('"z"'), 0, 3, at);
          closeSync(fd);
        };
        const err = await pinFiles(ctx, [file], options({ copy, confine: rewrite })).catch((e) => e);
        expect(err.message).toBe(`${path} changed while registering`);
        expect(ctx.registered.size).toBe(0);
      });
    }
  });

  it("frees the pinned copy when reading the file fails", async () => {
    await withSpy(async (ctx) => {
      const file = await inspectFile(checkpoint("disk"));
      const failure = new Error("EIO");
      ctx.before.fileReadHash = () => {
        throw failure;
      };
      await expect(pinFiles(ctx, [file], options())).rejects.toBe(failure);
      expect(ctx.called("hostAlloc")).toHaveLength(1);
    });
  });

  it("refuses a file replaced by another under the same path", async () => {
    await withSpy(async (ctx) => {
      const path = checkpoint("tmpfs");
      const file = await inspectFile(path);
      copyFileSync(path, `${path}.new`);
      renameSync(`${path}.new`, path);
      const err = await pinFiles(ctx, [file], options()).catch((e) => e);
      expect(err.message).toBe(`${path} was replaced while registering`);
      expect(ctx.called("fileMap")).toEqual([]);
    });
  });
});

describe("unpinFiles", () => {
  it("releases every file even when one fails, then throws the first failure", async () => {
    await withSpy(async (ctx) => {
      const files: InspectedFile[] = [];
      for (let i = 0; i < 3; i++) files.push(await inspectFile(checkpoint("disk")));
      const pinned = await pinFiles(ctx, files, options());
      const failing = new Set([pinned[0]?.mem.address, pinned[1]?.mem.address]);
      const failures: Error[] = [];
      ctx.before.hostFree = (mem: HostMemory) => {
        if (!failing.has(mem.address)) return;
        const err = new Error(`cannot free ${mem.address}`);
        failures.push(err);
        throw err;
      };
      const err = await unpinFiles(ctx, pinned).catch((e) => e);
      expect(failures).toHaveLength(2);
      expect(err).toBe(failures[0]);
      expect([...ctx.live.keys()]).toEqual([pinned[0]?.mem.address, pinned[1]?.mem.address]);
      ctx.before.hostFree = undefined;
    }, 2);
  });
});

describe("hashTensors", () => {
  it("hashes each file's tensors and ends its progress at the files' total size", async () => {
    await withSpy(async (ctx) => {
      const files = [await inspectFile(checkpoint("tmpfs")), await inspectFile(checkpoint("disk"))];
      const pinned = await pinFiles(ctx, files, options());
      const total = files.reduce((n, f) => n + f.size, 0);
      const progress = { bytesTotal: total, bytesPinned: total, bytesHashed: 0 };
      const opts = { threads: 2, signal: new AbortController().signal, progress };
      const hashes = await hashTensors(
        ctx,
        files.map((f, i) => ({ pinned: pinned[i] as PinnedFile, tensors: f.header.tensors })),
        opts,
      );
      const want = await Promise.all(
        files.map((f) =>
          Promise.all(f.header.tensors.map((t) => ckptHash(readFileSync(f.path).subarray(t.begin, t.end)))),
        ),
      );
      expect(hashes).toEqual(want);
      expect(progress.bytesHashed).toBe(total);
      await unpinFiles(ctx, pinned);
    });
  });
});

describe("readPieces", () => {
  const GiB = 2 ** 30;
  it("cuts a copy between tensors into spans of a GiB or more that cover the file once", () => {
    // Header 1000 bytes; tensors listed out of order; the last one leaves padding before the end.
    const sizes = [0.4, 0.7, 0.2, 2.5, 0.1, 0.9].map((g) => Math.round(g * GiB));
    const tensors: { begin: number; end: number }[] = [];
    let at = 1000;
    for (const n of sizes) {
      tensors.push({ begin: at, end: at + n });
      at += n;
    }
    const file = { size: at + 64, header: { tensors: [...tensors].reverse() } };
    const pieces = readPieces(file);
    expect(pieces.map((p) => p.tensors.map((i) => sizes.length - 1 - i))).toEqual([
      [0, 1],
      [2, 3],
      [4, 5],
    ]);
    expect(pieces[0]?.begin).toBe(0);
    for (const [k, p] of pieces.entries()) {
      if (k > 0) expect(p.begin).toBe(pieces[k - 1]?.end);
      if (k < pieces.length - 1) expect(p.end - p.begin).toBeGreaterThanOrEqual(GiB);
    }
    expect(pieces.at(-1)?.end).toBe(file.size);
  });

  it("reads a file of no tensors, or of small ones, in one piece", () => {
    expect(readPieces({ size: 500, header: { tensors: [] } })).toEqual([{ begin: 0, end: 500, tensors: [] }]);
    const small = {
      size: 300,
      header: {
        tensors: [
          { begin: 100, end: 200 },
          { begin: 200, end: 290 },
        ],
      },
    };
    expect(readPieces(small)).toEqual([{ begin: 0, end: 300, tensors: [0, 1] }]);
  });
});
