import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { DTYPE_BITS } from "../daemon/checkpoints/safetensors.ts";
import { resolveDirectory } from "../daemon/checkpoints/sources.ts";
import { type Config, defaults } from "../daemon/config/index.ts";
import type { Daemon } from "../daemon/daemon.ts";
import { ckptHash, safetensorsBytes, type WrittenTensor, writeModel, writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, early, removeTempDirs, tempDir, testCredentials, thrown } from "./helpers.ts";
import { startInProcess } from "./in-process.ts";

const running: Daemon[] = [];

async function start(overrides: Partial<Config> = {}): Promise<Daemon & { api: typeof api; uploadDir: string }> {
  const config: Config = {
    ...defaults({}),
    port: 0,
    backend: "host",
    stateDir: scratch(),
    uploadDir: scratch("/dev/shm"),
    registerRoots: ["/dev/shm", tmpdir()],
    ioThreads: 2,
    ...testCredentials(),
    ...overrides,
  };
  const daemon = await startInProcess(config);
  running.push(daemon);
  const base = `http://127.0.0.1:${daemon.port}`;
  async function api(method: string, path: string, body?: unknown, headers: Record<string, string> = {}) {
    const init: RequestInit = { method, headers: { ...AUTH, ...headers } };
    if (body instanceof Uint8Array) {
      init.body = body.slice();
      (init.headers as Record<string, string>)["content-type"] = "application/octet-stream";
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      (init.headers as Record<string, string>)["content-type"] = "application/json";
    }
    const res = await fetch(base + path, init);
    // biome-ignore lint/suspicious/noExplicitAny: test responses are checked field by field
    return { status: res.status, body: (await res.json()) as any, headers: res.headers };
  }
  return Object.assign(daemon, { api, uploadDir: config.uploadDir });
}

/** Directories removed after each test: a mutation run executes this file hundreds of times. */
function scratch(parent?: "/dev/shm"): string {
  return tempDir("ckptd-test-", parent);
}

afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
  removeTempDirs();
});

/** Every tensor of the manifest has the registered bytes' hash, as computed independently. */
async function expectManifestMatches(
  manifest: { tensors: { name: string; hash: string; bytes: number }[] },
  tensors: WrittenTensor[],
) {
  expect(manifest.tensors.map((t) => t.name).sort()).toEqual(tensors.map((t) => t.name).sort());
  for (const t of tensors) {
    const entry = manifest.tensors.find((m) => m.name === t.name);
    expect(entry?.bytes).toBe(t.bytes.byteLength);
    expect(entry?.hash).toBe(await ckptHash(t.bytes));
  }
}

describe("registering checkpoints", () => {
  it("registers a directory from tmpfs in place, with the manifest and hashes", async () => {
    const d = await start();
    const dir = scratch("/dev/shm");
    const tensors = writeModel(dir);
    const res = await d.api("POST", "/v1/checkpoints", { name: "qwen", dir });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ id: "qwen@1", state: "ready", tensorCount: tensors.length });
    expect(res.headers.get("location")).toBe("/v1/checkpoints/qwen@1");
    const manifest = (await d.api("GET", "/v1/checkpoints/qwen@1")).body;
    expect(manifest.files.every((f: { inPlace: boolean }) => f.inPlace)).toBe(true);
    await expectManifestMatches(manifest, tensors);
    // The pinned copy is the file's own pages: the registered bytes are the file's bytes.
    const v = d.registry.get("qwen@1");
    const file0 = readFileSync(v.files[0]?.path as string);
    expect(Buffer.compare(v.pinned[0]?.mem.view() as Uint8Array, file0)).toBe(0);
    rmSync(dir, { recursive: true });
  });

  it("reads other files into pinned memory, and versions each registration", async () => {
    const d = await start();
    const dir = scratch();
    const tensors = writeModel(dir, 3);
    const files = [...new Set(tensors.map((t) => t.file))];
    expect((await d.api("POST", "/v1/checkpoints", { name: "m", files })).status).toBe(201);
    expect((await d.api("POST", "/v1/checkpoints", { name: "m", dir })).body.id).toBe("m@2");
    const latest = (await d.api("GET", "/v1/checkpoints/m")).body;
    expect(latest.id).toBe("m@2");
    expect(latest.files.every((f: { inPlace: boolean }) => !f.inPlace)).toBe(true);
    await expectManifestMatches(latest, tensors);
    const list = (await d.api("GET", "/v1/checkpoints")).body;
    expect(list.checkpoints.map((c: { id: string }) => c.id)).toEqual(["m@1", "m@2"]);
    expect(list.pinnedBytes).toBe(2 * files.reduce((s, f) => s + readFileSync(f).byteLength, 0));
  });

  it("follows model.safetensors.index.json and checks it against the files", async () => {
    const d = await start();
    const dir = scratch();
    const tensors = writeModel(dir, 2);
    const weightMap = Object.fromEntries(tensors.map((t) => [t.name, t.file.split("/").pop()]));
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: weightMap }));
    writeSafetensors(join(dir, "stray.safetensors"), [{ name: "stray", dtype: "U8", shape: [4] }]);
    const ok = await d.api("POST", "/v1/checkpoints", { name: "idx", dir });
    expect(ok.body.tensorCount).toBe(tensors.length); // the stray file is not in the index
    weightMap["lm_head.weight"] = "model-1-of-2.safetensors";
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: weightMap }));
    const bad = await d.api("POST", "/v1/checkpoints", { name: "idx", dir });
    expect(bad.status).toBe(400);
    expect(bad.body.error.message).toMatch(
      /puts "lm_head.weight" in .*model-1-of-2.safetensors but it is in .*model-2-of-2/,
    );
  });

  it("cancels through the API: DELETE of a registering version", async () => {
    const d = await start();
    const dir = scratch();
    for (let i = 0; i < 4; i++)
      writeSafetensors(join(dir, `f${i}.safetensors`), [{ name: `w${i}`, dtype: "U8", shape: [16 << 20] }]);
    const res = await d.api("POST", "/v1/checkpoints", { name: "c", dir, wait: false });
    expect(res.status).toBe(202);
    expect((await d.api("DELETE", "/v1/checkpoints/c@1")).body).toEqual({ deleted: ["c@1"] });
    expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ checkpoints: [], pinnedBytes: 0 });
  });

  it("reports progress while registering in the background", async () => {
    const d = await start();
    const dir = scratch();
    writeSafetensors(join(dir, "big.safetensors"), [{ name: "w", dtype: "U8", shape: [64 << 20] }]);
    const res = await d.api("POST", "/v1/checkpoints", { name: "big", dir, wait: false });
    expect(res.status).toBe(202);
    expect(res.body.state).toBe("registering");
    let last = 0;
    for (;;) {
      const now = (await d.api("GET", "/v1/checkpoints/big@1")).body;
      expect(now.progress.bytesPinned).toBeGreaterThanOrEqual(last);
      last = now.progress.bytesPinned;
      if (now.state !== "registering") {
        expect(now.state).toBe("ready");
        expect(now.progress).toEqual({ bytesTotal: now.bytes, bytesPinned: now.bytes, bytesHashed: now.bytes });
        break;
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  });
});

describe("bad registrations register nothing", () => {
  it.each([
    {
      name: "a header rule",
      make: (dir: string) =>
        writeFileSync(join(dir, "x.safetensors"), Buffer.from([4, 0, 0, 0, 0, 0, 0, 0, 123, 125, 125, 125])),
      status: 400,
      message: /x.safetensors: header is not valid UTF-8 JSON/,
    },
    {
      name: "a duplicated tensor",
      make: (dir: string) => {
        writeSafetensors(join(dir, "a.safetensors"), [{ name: "w", dtype: "U8", shape: [8] }]);
        writeSafetensors(join(dir, "b.safetensors"), [{ name: "w", dtype: "U8", shape: [8] }]);
      },
      status: 400,
      message: /b.safetensors: tensor "w": also defined in .*a.safetensors/,
    },
    {
      name: "an empty directory",
      make: () => undefined,
      status: 400,
      message: /no model.safetensors.index.json and no \*.safetensors files/,
    },
  ])("$name", async ({ make, status, message }) => {
    const d = await start();
    const dir = scratch();
    make(dir);
    const res = await d.api("POST", "/v1/checkpoints", { name: "bad", dir });
    expect(res.status).toBe(status);
    expect(res.body.error.message).toMatch(message);
    expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ checkpoints: [], pinnedBytes: 0 });
  });

  it.each([
    [{ name: "x" }, /give exactly one of dir, files and pull/],
    [{ name: "x", dir: "/a", files: ["/b"] }, /give exactly one of dir, files and pull/],
    [{ name: "bad name", dir: "/tmp" }, /checkpoint name "bad name" must match/],
    [{ name: "x", dir: "relative" }, /dir must be an absolute path/],
    [{ name: "x", files: ["/dev/shm/nonexistent.safetensors"] }, /\/nonexistent.safetensors: no such file/],
    [{ name: "x", dir: "/tmp", extra: 1 }, /extra/],
  ])("rejects the request %j", async (body, message) => {
    const d = await start();
    const res = await d.api("POST", "/v1/checkpoints", body);
    expect(res.status).toBe(400);
    expect(res.body.error.message).toMatch(message);
  });

  it("refuses to exceed the pinned-memory budget with a 507 saying by how much", async () => {
    const dir = scratch();
    writeSafetensors(join(dir, "a.safetensors"), [{ name: "w", dtype: "U8", shape: [4096] }]);
    const size = readFileSync(join(dir, "a.safetensors")).byteLength;
    const d = await start({ pinnedBudgetBytes: size + 100 });
    expect((await d.api("POST", "/v1/checkpoints", { name: "a", dir })).status).toBe(201);
    const res = await d.api("POST", "/v1/checkpoints", { name: "a", dir });
    expect(res.status).toBe(507);
    expect(res.body.error.message).toContain(`by ${size - 100} bytes`);
    expect(res.body.error.details).toMatchObject({ overBytes: size - 100 });
    expect((await d.api("GET", "/v1/checkpoints")).body.checkpoints).toHaveLength(1);
  });

  it("counts registrations still in flight against the budget: of two at once that fit one, one gets the 507", async () => {
    const dir = scratch();
    writeSafetensors(join(dir, "a.safetensors"), [{ name: "w", dtype: "U8", shape: [16 << 20] }]);
    const size = statSync(join(dir, "a.safetensors")).size;
    const d = await start({ pinnedBudgetBytes: size + 100 });
    const both = await Promise.all(["a", "b"].map((name) => d.api("POST", "/v1/checkpoints", { name, dir })));
    expect(both.map((r) => r.status).sort()).toEqual([201, 507]);
    expect(both.find((r) => r.status === 507)?.body.error.details).toMatchObject({ usedBytes: size });
    expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ pinnedBytes: size });
  });

  it.each(["toString", "constructor", "__proto__"])(
    "answers the dtype %j (a property of every object) with a 400 naming the file, tensor and rule",
    async (dtype) => {
      const d = await start();
      const path = join(scratch(), "x.safetensors");
      writeFileSync(path, safetensorsBytes({ w: { dtype, shape: [4], data_offsets: [0, 4] } }, 4));
      const res = await d.api("POST", "/v1/checkpoints", { name: "proto", files: [path] });
      expect(res.status).toBe(400);
      const rule = `dtype "${dtype}" is not one of ${Object.keys(DTYPE_BITS).join(", ")}`;
      expect(res.body.error).toEqual({
        code: "invalid_safetensors",
        message: `${path}: tensor "w": ${rule}`,
        details: { file: path, tensor: "w", rule },
      });
      expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ checkpoints: [], pinnedBytes: 0 });
    },
  );
});

describe("fuzzing registration", () => {
  it("answers mutated and truncated files with a 400 or a correct registration, never a 500", async () => {
    const d = await start();
    const dir = scratch();
    const tensors = writeSafetensors(join(dir, "base.safetensors"), [
      { name: "a", dtype: "BF16", shape: [8, 4] },
      { name: "b", dtype: "F32", shape: [5] },
    ]);
    const base = readFileSync(join(dir, "base.safetensors"));
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const seen = new Set<number>();
    for (let i = 0; i < 60; i++) {
      let bytes = Buffer.from(base);
      if (i % 3 === 0) bytes = bytes.subarray(0, Math.floor(random() * bytes.byteLength));
      else
        for (let k = 0; k < 3; k++)
          bytes[Math.floor(random() * Math.min(bytes.byteLength, 120))] = Math.floor(random() * 256);
      const path = join(dir, `fuzz-${i}.safetensors`);
      writeFileSync(path, bytes);
      const res = await d.api("POST", "/v1/checkpoints", { name: "fuzz", files: [path] });
      seen.add(res.status);
      expect([201, 400]).toContain(res.status);
      if (res.status === 201) {
        // Accepted: the manifest must describe exactly the bytes in the file.
        const manifest = (await d.api("GET", `/v1/checkpoints/${res.body.id}`)).body;
        for (const t of manifest.tensors) {
          expect(t.hash).toBe(await ckptHash(bytes.subarray(t.offset, t.offset + t.bytes)));
        }
        await d.api("DELETE", `/v1/checkpoints/${res.body.id}`);
      }
    }
    expect(seen.has(400)).toBe(true);
    expect(tensors).toHaveLength(2);
    expect((await d.api("GET", "/v1/checkpoints")).body.pinnedBytes).toBe(0);
  });
});

describe("deleting and limits", () => {
  it("deletes a version, refusing with 409 while an update uses it", async () => {
    const d = await start();
    const dir = scratch();
    writeModel(dir);
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    const lease = d.registry.acquire("m@1");
    const busy = await d.api("DELETE", "/v1/checkpoints/m@1");
    expect(busy.status).toBe(409);
    expect(busy.body.error.message).toBe("m@1 is in use (by an update, or a pull or push copying from it)");
    lease.release();
    expect((await d.api("DELETE", "/v1/checkpoints/m@1")).body).toEqual({ deleted: ["m@1"] });
    expect((await d.api("GET", "/v1/checkpoints/m@1")).status).toBe(404);
    expect((await d.api("GET", "/v1/checkpoints")).body.pinnedBytes).toBe(0);
  });

  it("lets no update lease a version once its delete has begun", async () => {
    const d = await start();
    const dir = scratch();
    writeModel(dir);
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    const deleting = d.registry.delete("m@1");
    expect(() => d.registry.acquire("m@1")).toThrow(/m@1 is being deleted|no checkpoint m@1/);
    await deleting;
  });

  it("lets no update lease the ready version of a name whose delete waits on an earlier registration", async () => {
    const d = await start();
    const big = scratch();
    for (let i = 0; i < 4; i++)
      writeSafetensors(join(big, `f${i}.safetensors`), [{ name: `w${i}`, dtype: "U8", shape: [32 << 20] }]);
    const small = scratch();
    writeModel(small);
    const first = await d.registry.register({ name: "m", source: resolveDirectory(big), copy: false, adopt: false });
    expect((await d.api("POST", "/v1/checkpoints", { name: "m", dir: small })).body.id).toBe("m@2");
    expect(first.state).toBe("registering"); // else this test shows nothing
    const deleting = d.registry.delete("m");
    // m@2 is still listed and ready while the delete waits for m@1's cancel.
    for (const ref of ["m@2", "m"]) {
      const err = thrown(() => d.registry.acquire(ref));
      expect(err.message).toBe("m@2 is being deleted");
      expect(err.code).toBe("not_ready");
    }
    expect((await deleting).map((v) => v.id)).toEqual(["m@1", "m@2"]);
    expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ checkpoints: [], pinnedBytes: 0 });
  });

  it("keeps every registration when many finish at once", async () => {
    const d = await start();
    const dir = scratch();
    writeModel(dir);
    const all = await Promise.all(
      Array.from({ length: 8 }, (_, i) => d.api("POST", "/v1/checkpoints", { name: `m${i}`, dir })),
    );
    expect(all.map((r) => r.body.state)).toEqual(Array(8).fill("ready"));
  });

  it("keeps the newest maxVersions per name, and an older one while it is in use", async () => {
    const d = await start({ maxVersions: 2 });
    const dir = scratch();
    writeModel(dir);
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    const lease = d.registry.acquire("m@1");
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    // m@1 is in use, so it stays beside the newest two.
    expect(d.registry.list().map((v) => v.id)).toEqual(["m@1", "m@2", "m@3"]);
    lease.release();
    await d.api("POST", "/v1/checkpoints", { name: "m", dir });
    expect(d.registry.list().map((v) => v.id)).toEqual(["m@3", "m@4"]);
  });

  it("cancels a registration in flight, leaving nothing pinned", async () => {
    const d = await start();
    const dir = scratch();
    for (let i = 0; i < 4; i++)
      writeSafetensors(join(dir, `f${i}.safetensors`), [{ name: `w${i}`, dtype: "U8", shape: [32 << 20] }]);
    // Through the registry, so the cancel lands before the first file is pinned.
    const version = await d.registry.register({ name: "c", source: resolveDirectory(dir), copy: false, adopt: false });
    expect((await d.registry.delete("c@1")).map((v) => v.id)).toEqual(["c@1"]);
    expect(version.error?.code).toBe("cancelled");
    expect(version.pinned).toEqual([]);
    expect((await d.api("GET", "/v1/checkpoints")).body).toMatchObject({ checkpoints: [], pinnedBytes: 0 });
    // The next registration takes the next number; numbers are never reused.
    expect((await d.api("POST", "/v1/checkpoints", { name: "c", dir })).body.id).toBe("c@2");
  });
});

describe("restart", () => {
  it("restores unchanged checkpoints and reports the others", async () => {
    const stateDir = scratch();
    const keep = scratch();
    const change = scratch();
    const tensors = writeModel(keep);
    writeModel(change);
    const first = await start({ stateDir });
    await first.api("POST", "/v1/checkpoints", { name: "keep", dir: keep });
    await first.api("POST", "/v1/checkpoints", { name: "change", dir: change });
    await first.stop();
    running.splice(running.indexOf(first), 1);
    const touched = join(change, "model-1-of-2.safetensors");
    utimesSync(touched, new Date(), new Date(Date.now() + 5000));

    const second = await start({ stateDir });
    const status = (await second.api("GET", "/v1/status")).body;
    expect(status.checkpoints.restore).toEqual({
      restored: ["keep@1"],
      notRestored: [
        { id: "change@1", reason: `${touched} changed since it was registered (size or modification time)` },
      ],
    });
    await expectManifestMatches((await second.api("GET", "/v1/checkpoints/keep@1")).body, tensors);
    // Numbers continue after a restart.
    expect((await second.api("POST", "/v1/checkpoints", { name: "keep", dir: keep })).body.id).toBe("keep@2");
  });
});

describe("restart, content changed in place", () => {
  it("refuses a version whose bytes changed though size and modification time did not", async () => {
    const stateDir = scratch();
    const path = join(scratch(), "h.safetensors");
    writeSafetensors(path, [{ name: "w", dtype: "U8", shape: [64] }]);
    const mtime = new Date(1_700_000_000_000); // whole seconds: utimes sets it back exactly
    utimesSync(path, mtime, mtime);
    const first = await start({ stateDir });
    expect((await first.api("POST", "/v1/checkpoints", { name: "h", files: [path] })).status).toBe(201);
    await first.stop();
    running.splice(running.indexOf(first), 1);
    const bytes = readFileSync(path);
    bytes[bytes.byteLength - 1] = (bytes[bytes.byteLength - 1] as number) ^ 0xff; // the last byte of "w"
    writeFileSync(path, bytes);
    utimesSync(path, mtime, mtime);

    const second = await start({ stateDir });
    expect((await second.api("GET", "/v1/status")).body.checkpoints.restore).toEqual({
      restored: [],
      notRestored: [{ id: "h@1", reason: 'tensor "w" no longer has the hash it was registered with' }],
    });
    const list = (await second.api("GET", "/v1/checkpoints")).body;
    expect(list.pinnedBytes).toBe(0);
    expect(list.checkpoints.map((c: { id: string; state: string }) => [c.id, c.state])).toEqual([["h@1", "failed"]]);
  });
});

describe("trainer pushes", () => {
  it("takes raw tensors over HTTP and commits them as a version", async () => {
    const d = await start();
    const specs = [
      { name: "a.weight", dtype: "BF16", shape: [16, 8] },
      { name: "b.bias", dtype: "F32", shape: [8] },
    ];
    const created = await d.api("POST", "/v1/uploads", { name: "pushed", tensors: specs });
    expect(created.status).toBe(201);
    const id = created.body.id;
    const a = new Uint8Array(256).map((_, i) => i);
    const b = new Uint8Array(32).map((_, i) => 255 - i);
    expect((await d.api("PUT", `/v1/uploads/${id}/tensors/a.weight`, a.subarray(0, 100))).status).toBe(400);
    const early = await d.api("POST", `/v1/uploads/${id}/commit`);
    expect(early.status).toBe(400);
    expect(early.body.error.message).toMatch(/tensors not uploaded yet: a.weight, b.bias/);
    expect((await d.api("PUT", `/v1/uploads/${id}/tensors/a.weight`, a)).status).toBe(200);
    expect((await d.api("PUT", `/v1/uploads/${id}/tensors/b.bias`, b)).status).toBe(200);
    const committed = await d.api("POST", `/v1/uploads/${id}/commit`);
    expect(committed.status).toBe(201);
    expect(committed.body.id).toBe("pushed@1");
    const manifest = (await d.api("GET", "/v1/checkpoints/pushed@1")).body;
    expect(manifest.tensors.find((t: { name: string }) => t.name === "a.weight").hash).toBe(await ckptHash(a));
    expect(manifest.tensors.find((t: { name: string }) => t.name === "b.bias").hash).toBe(await ckptHash(b));
    expect(manifest.files[0]).toMatchObject({ inPlace: true, adopted: true });
    // Dropping the version deletes the daemon's file.
    await d.api("DELETE", "/v1/checkpoints/pushed@1");
    expect(() => readFileSync(manifest.files[0].path)).toThrow(/ENOENT/);
  });

  it("says what is wrong with a push, and a deleted upload leaves no file behind", async () => {
    const d = await start();
    const errorOf = async (method: string, path: string, body?: unknown) => {
      const res = await d.api(method, path, body);
      return [res.status, res.body.error?.message];
    };
    const w = { name: "w", dtype: "U8", shape: [4] };
    expect(await errorOf("POST", "/v1/uploads", { name: "p", tensors: [w, w] })).toEqual([
      400,
      'tensor "w" is declared twice',
    ]);
    expect(await errorOf("POST", "/v1/uploads", { name: "p", tensors: [{ ...w, dtype: "F4", shape: [3] }] })).toEqual([
      400,
      "shape [3] of F4 is not whole bytes",
    ]);
    expect((await errorOf("POST", "/v1/uploads", { name: "p@1" }))[0]).toBe(400);
    const empty = (await d.api("POST", "/v1/uploads", { name: "p" })).body.id;
    expect(await errorOf("POST", `/v1/uploads/${empty}/commit`)).toEqual([
      400,
      `upload ${empty} holds no tensors or files`,
    ]);
    expect(await errorOf("PUT", `/v1/uploads/${empty}/files/x.bin`, new Uint8Array(1))).toEqual([
      400,
      'file name "x.bin" must be a plain name ending in .safetensors',
    ]);

    const created = await d.api("POST", "/v1/uploads", { name: "p", tensors: [w] });
    const id = created.body.id;
    expect(created.body).toEqual({ id, name: "p", tensors: [{ name: "w", bytes: 4, written: false }], files: [] });
    expect(await errorOf("PUT", `/v1/uploads/${id}/tensors/v`, new Uint8Array(4))).toEqual([
      404,
      `upload ${id} declares no tensor "v"`,
    ]);
    expect(await errorOf("PUT", `/v1/uploads/${id}/tensors/w`, new Uint8Array(5))).toEqual([
      400,
      'tensor "w" needs exactly 4 bytes, got more',
    ]);
    expect(await errorOf("PUT", `/v1/uploads/${id}/tensors/w`, new Uint8Array(3))).toEqual([
      400,
      'tensor "w" needs exactly 4 bytes, got 3',
    ]);
    expect((await d.api("PUT", `/v1/uploads/${id}/tensors/w`, new Uint8Array(4))).body).toEqual({
      name: "w",
      bytes: 4,
    });
    const file = writeSafetensors(join(scratch(), "f.safetensors"), [{ name: "f", dtype: "U8", shape: [8] }])[0];
    const put = await d.api("PUT", `/v1/uploads/${id}/files/f.safetensors`, readFileSync(file?.file as string));
    expect(put.body).toEqual({ file: "f.safetensors", bytes: statSync(file?.file as string).size });
    const listed = (await d.api("GET", "/v1/uploads")).body.uploads;
    expect(listed.find((u: { id: string }) => u.id === id)).toEqual({
      id,
      name: "p",
      tensors: [{ name: "w", bytes: 4, written: true }],
      files: ["f.safetensors"],
    });

    const before = readdirSync(d.uploadDir);
    expect(before.filter((n) => n.startsWith(id))).toHaveLength(2);
    expect((await d.api("DELETE", `/v1/uploads/${id}`)).body).toEqual({ deleted: id });
    expect(readdirSync(d.uploadDir).filter((n) => n.startsWith(id))).toEqual([]);
    expect(await errorOf("POST", `/v1/uploads/${id}/commit`)).toEqual([404, `no upload ${id}`]);
    // The missing upload is named before a bad body.
    expect(await errorOf("POST", `/v1/uploads/${id}/commit`, { wait: "no" })).toEqual([404, `no upload ${id}`]);
    expect((await d.api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("takes a safetensors file stream", async () => {
    const d = await start();
    const dir = scratch();
    const tensors = writeSafetensors(join(dir, "x.safetensors"), [{ name: "w", dtype: "F16", shape: [33, 7] }]);
    const { id } = (await d.api("POST", "/v1/uploads", { name: "streamed" })).body;
    const put = await d.api(
      "PUT",
      `/v1/uploads/${id}/files/model.safetensors`,
      new Uint8Array(readFileSync(join(dir, "x.safetensors"))),
    );
    expect(put.status).toBe(200);
    const committed = await d.api("POST", `/v1/uploads/${id}/commit`, { wait: true });
    expect(committed.status).toBe(201);
    await expectManifestMatches((await d.api("GET", "/v1/checkpoints/streamed")).body, tensors);
  });

  it("adopts files a trainer wrote to shared memory", async () => {
    const d = await start();
    const dir = scratch("/dev/shm");
    const tensors = writeModel(dir, 1);
    const res = await d.api("POST", "/v1/checkpoints", { name: "shm", dir, adopt: true });
    expect(res.status).toBe(201);
    await expectManifestMatches((await d.api("GET", "/v1/checkpoints/shm@1")).body, tensors);
    await d.api("DELETE", "/v1/checkpoints/shm");
    expect(() => readFileSync(tensors[0]?.file as string)).toThrow(/ENOENT/);
    rmSync(dir, { recursive: true });
  });
});

describe("size limits", () => {
  it("answers a JSON body over maxBodyBytes with a 413 naming the limit, and registers nothing", async () => {
    const d = await start({ maxBodyBytes: 4096 });
    const files = Array.from({ length: 200 }, (_, i) => `/dev/shm/file-${i}.safetensors`);
    const res = await d.api("POST", "/v1/checkpoints", { name: "big", files });
    expect(res.status).toBe(413);
    expect(res.body.error.code).toBe("body_too_large");
    expect(res.body.error.message).toMatch(/exceeds the limit of 4096 bytes \(maxBodyBytes\)$/);
    expect((await d.api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("answers a body declared larger than the limit at once, before it is sent", async () => {
    const d = await start({ maxBodyBytes: 4096 });
    const headers = { "content-type": "application/json", "content-length": String(1 << 30) };
    const { status, body } = await early(d.port, "POST", "/v1/checkpoints", headers, [new Uint8Array([0x7b])]);
    expect(status).toBe(413);
    expect(body.error.message).toBe("request body of 1073741824 bytes exceeds the limit of 4096 bytes (maxBodyBytes)");
  });

  it("refuses an upload declaring more than the pinned-memory budget with a 507 at declaration, staging nothing", async () => {
    const d = await start({ pinnedBudgetBytes: 1 << 20 });
    const res = await d.api("POST", "/v1/uploads", {
      name: "huge",
      tensors: [{ name: "w", dtype: "F32", shape: [1 << 18, 1 << 20] }], // 1 TiB
    });
    expect(res.status).toBe(507);
    expect(res.body.error.code).toBe("over_budget");
    expect(res.body.error.message).toBe(
      `declaring tensors of ${2 ** 40} bytes would exceed the pinned-memory budget of 1048576 bytes by ${2 ** 40 - (1 << 20)} bytes (0 in use)`,
    );
    expect(existsSync(d.uploadDir) ? readdirSync(d.uploadDir) : []).toEqual([]);
    expect((await d.api("GET", "/v1/uploads")).body.uploads).toEqual([]);
  });

  it("stops a streamed file at what the budget leaves, with a 413 naming the limit, and keeps none of it", async () => {
    const d = await start({ pinnedBudgetBytes: 64 << 10 });
    const { id } = (await d.api("POST", "/v1/uploads", { name: "streamed" })).body;
    const octets = { "content-type": "application/octet-stream" };
    const chunks = Array.from({ length: 64 }, () => new Uint8Array(16 << 10)); // 1 MiB, chunked
    const res = await early(d.port, "PUT", `/v1/uploads/${id}/files/model.safetensors`, octets, chunks);
    expect(res.status).toBe(413);
    expect(res.body.error).toMatchObject({
      code: "body_too_large",
      message: `file "model.safetensors" exceeds the 65536 bytes the pinned-memory budget leaves (pinnedBudgetBytes); nothing was kept`,
    });
    expect(readdirSync(d.uploadDir).filter((n) => n.startsWith(id))).toEqual([]);
    expect((await d.api("GET", "/v1/uploads")).body.uploads).toEqual([
      { id, name: "streamed", tensors: [], files: [] },
    ]);
    // A file that fits is taken, and the upload's own staging counts against what is left.
    const dir = scratch("/dev/shm");
    const tensors = writeSafetensors(join(dir, "x.safetensors"), [{ name: "w", dtype: "U8", shape: [40 << 10] }]);
    const bytes = new Uint8Array(readFileSync(join(dir, "x.safetensors")));
    expect((await d.api("PUT", `/v1/uploads/${id}/files/a.safetensors`, bytes)).status).toBe(200);
    // Declared too large: refused before a byte is read.
    const declared = { ...octets, "content-length": String(bytes.byteLength) };
    const second = await early(d.port, "PUT", `/v1/uploads/${id}/files/b.safetensors`, declared, []);
    expect(second.status).toBe(413);
    expect(second.body.error.details).toEqual({ limitBytes: (64 << 10) - bytes.byteLength });
    expect(readdirSync(d.uploadDir).filter((n) => n.startsWith(id))).toEqual([`${id}-a.safetensors`]);
    expect((await d.api("POST", `/v1/uploads/${id}/commit`)).status).toBe(201);
    await expectManifestMatches((await d.api("GET", "/v1/checkpoints/streamed")).body, tensors);
  });
});

describe("restart under the other runtime", () => {
  // Node reports mtimeMs with a fraction (rounded from nanoseconds), Deno truncated to whole
  // milliseconds: a registry saved under one is restored under the other.
  it.each([
    { name: "saved fractional (Node), restored whole (Deno)", touch: "@1700000000.123000000", saved: 1700000000123.25 },
    { name: "saved whole (Deno), restored fractional (Node)", touch: "@1700000000.123456789", saved: 1700000000123 },
    {
      name: "saved whole (Deno), Node rounding up to the next ms",
      touch: "@1700000000.000999999",
      saved: 1700000000000,
    },
  ])("restores a version $name", async ({ touch, saved }) => {
    const stateDir = scratch();
    const dir = scratch("/dev/shm");
    const tensors = writeModel(dir, 1);
    const path = tensors[0]?.file as string;
    execFileSync("touch", ["-d", touch, path]);
    const first = await start({ stateDir });
    expect((await first.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    await first.stop();
    running.splice(running.indexOf(first), 1);
    const file = join(stateDir, "registry.json");
    const registry = JSON.parse(readFileSync(file, "utf8"));
    registry.versions[0].files[0].mtimeMs = saved;
    writeFileSync(file, JSON.stringify(registry));

    const second = await start({ stateDir });
    expect((await second.api("GET", "/v1/status")).body.checkpoints.restore).toEqual({
      restored: ["m@1"],
      notRestored: [],
    });
  });

  it("still refuses a file modified a few milliseconds later", async () => {
    const stateDir = scratch();
    const dir = scratch("/dev/shm");
    const path = writeModel(dir, 1)[0]?.file as string;
    execFileSync("touch", ["-d", "@1700000000.123000000", path]);
    const first = await start({ stateDir });
    expect((await first.api("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    await first.stop();
    running.splice(running.indexOf(first), 1);
    execFileSync("touch", ["-d", "@1700000000.125000000", path]);
    const second = await start({ stateDir });
    expect((await second.api("GET", "/v1/status")).body.checkpoints.restore.notRestored).toEqual([
      { id: "m@1", reason: `${path} changed since it was registered (size or modification time)` },
    ]);
  });
});
