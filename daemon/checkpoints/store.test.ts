import { existsSync, readdirSync, readFileSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type Context, openBackend } from "../../ffi/index.ts";
import { writeSafetensors } from "../../test/checkpoint-files.ts";
import { tempDir } from "../../test/helpers.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import { FilePolicy } from "./confine.ts";
import { type RegisterRequest, Registry } from "./registry.ts";
import { registryFile, restoreRegistry, saveRegistry } from "./store.ts";

let ctx: Context;
const registries: Registry[] = [];
const silent = pino({ level: "silent" });

beforeAll(async () => {
  ctx = (await openBackend("host", LIB_DIR)).context;
});

afterEach(async () => {
  for (const r of registries.splice(0)) await r.close();
});

afterAll(async () => {
  await ctx.destroy();
});

/** A registry saving to `stateDir` after every change, as the daemon runs it. */
function newRegistry(stateDir: string): Registry {
  const files = new FilePolicy({ roots: ["/dev/shm", tmpdir()], uploadDir: tempDir(), uid: process.getuid?.() ?? 0 });
  const registry = new Registry({
    ctx,
    log: silent,
    budgetBytes: 0,
    maxVersions: 10,
    threads: 2,
    files,
    onChange: (r) => saveRegistry(stateDir, r),
  });
  registries.push(registry);
  return registry;
}

/** A safetensors file in a fresh directory on tmpfs or on disk. */
function model(where: "tmpfs" | "disk" = "tmpfs"): string {
  const path = join(where === "tmpfs" ? tempDir("ckptd-test-", "/dev/shm") : tempDir(), "m.safetensors");
  writeSafetensors(path, [
    { name: "a", dtype: "F32", shape: [16, 4] },
    { name: "b", dtype: "BF16", shape: [10] },
  ]);
  return path;
}

async function register(registry: Registry, name: string, path: string, more: Partial<RegisterRequest> = {}) {
  const v = await registry.register({ name, source: { files: [path] }, copy: false, adopt: false, ...more });
  await v.done;
  return v;
}

// biome-ignore lint/suspicious/noExplicitAny: the saved JSON, checked field by field
function savedJson(stateDir: string): any {
  return JSON.parse(readFileSync(registryFile(stateDir), "utf8"));
}

describe("saveRegistry", () => {
  it("writes the ready versions and the next numbers, readable by the daemon's user only", async () => {
    const stateDir = tempDir();
    const registry = newRegistry(stateDir);
    const path = model();
    const v = await register(registry, "m", path);
    // A version whose restore fails stays listed as failed; it is not saved.
    const failed = await register(registry, "m", path, {
      restore: { version: 7, createdAt: v.createdAt, files: v.files, tensors: [] },
    });
    expect(failed.state).toBe("failed");
    await saveRegistry(stateDir, registry);
    const saved = savedJson(stateDir);
    expect(saved).toEqual({
      format: 3,
      next: { m: 8 },
      versions: [{ name: "m", version: 1, createdAt: v.createdAt, files: v.files, tensors: v.tensors }],
      registering: [],
    });
    expect(statSync(registryFile(stateDir)).mode & 0o777).toBe(0o600);
    expect(readdirSync(stateDir)).toEqual(["registry.json"]);
  });
});

describe("restoreRegistry", () => {
  it("never hands out again a number taken by a registration cut off by a stop, and reports it", async () => {
    const stateDir = tempDir();
    const before = newRegistry(stateDir);
    await register(before, "m", model());
    // The daemon dies while m@2 registers: what is on disk is what register() saved.
    const cut = await before.register({ name: "m", source: { files: [model()] }, copy: false, adopt: false });
    expect(cut.id).toBe("m@2");
    expect(savedJson(stateDir)).toMatchObject({ next: { m: 3 }, registering: ["m@2"] });
    const onDisk = readFileSync(registryFile(stateDir));
    await cut.done;
    await before.close();
    writeFileSync(registryFile(stateDir), onDisk);
    const after = newRegistry(stateDir);
    expect(await restoreRegistry(stateDir, after, silent)).toEqual({
      restored: ["m@1"],
      notRestored: [{ id: "m@2", reason: "its registration was cut off when the daemon stopped; register it again" }],
    });
    expect((await register(after, "m", model())).id).toBe("m@3");
  });

  it("keeps a tmpfs file in place in a version that also holds a file on disk", async () => {
    const stateDir = tempDir();
    const before = newRegistry(stateDir);
    const disk = model("disk");
    const shm = join(tempDir("ckptd-test-", "/dev/shm"), "n.safetensors");
    writeSafetensors(shm, [{ name: "c", dtype: "F32", shape: [8] }]);
    const v = await before.register({ name: "mixed", source: { files: [disk, shm] }, copy: false, adopt: false });
    await v.done;
    expect(v.files.map((f) => f.inPlace)).toEqual([false, true]);
    await before.close();
    const after = newRegistry(stateDir);
    expect(await restoreRegistry(stateDir, after, silent)).toEqual({ restored: ["mixed@1"], notRestored: [] });
    expect(after.list()[0]?.files.map((f) => f.inPlace)).toEqual([false, true]);
  });

  it("restores what was saved: numbers, creation times, copies, in-place files and adoptions", async () => {
    const stateDir = tempDir();
    const before = newRegistry(stateDir);
    const inPlace = model();
    const copied = model();
    const adopted = model("disk");
    const a = await register(before, "a", inPlace);
    const b = await register(before, "b", copied, { copy: true });
    const c = await register(before, "c", adopted, { adopt: true });
    await register(before, "a", inPlace);
    await before.delete("a@2");
    await before.close();

    const after = newRegistry(stateDir);
    const report = await restoreRegistry(stateDir, after, silent);
    expect(report).toEqual({ restored: ["a@1", "b@1", "c@1"], notRestored: [] });
    const got = after.list();
    expect(got.map((v) => [v.id, v.createdAt, v.state])).toEqual([
      ["a@1", a.createdAt, "ready"],
      ["b@1", b.createdAt, "ready"],
      ["c@1", c.createdAt, "ready"],
    ]);
    expect(got.map((v) => v.files.map((f) => [f.inPlace, f.adopted]))).toEqual([
      [[true, false]],
      [[false, false]],
      [[false, true]],
    ]);
    expect(got.map((v) => v.tensors)).toEqual([a.tensors, b.tensors, c.tensors]);
    // Numbers are never reused, even those of deleted versions.
    expect(after.nextVersions()).toEqual({ a: 3, b: 2, c: 2 });
    // Still adopted: deleting it deletes the file.
    await after.delete("c");
    expect(existsSync(adopted)).toBe(false);
  });

  it("reports each version it could not restore and why, restoring the others", async () => {
    const stateDir = tempDir();
    const before = newRegistry(stateDir);
    const changed = model();
    const gone = model();
    await register(before, "a", changed);
    await register(before, "b", gone);
    await register(before, "c", model());
    await before.close();
    utimesSync(changed, 1_600_000_000, 1_600_000_000);
    writeFileSync(gone, "");

    const after = newRegistry(stateDir);
    const report = await restoreRegistry(stateDir, after, silent);
    expect(report.restored).toEqual(["c@1"]);
    expect(report.notRestored).toEqual([
      { id: "a@1", reason: `${changed} changed since it was registered (size or modification time)` },
      { id: "b@1", reason: expect.stringContaining(gone) },
    ]);
    expect(after.list().map((v) => v.id)).toEqual(["c@1"]);
  });

  it("reports a version whose tensors no longer hash as saved", async () => {
    const stateDir = tempDir();
    const path = model();
    const probe = newRegistry(tempDir());
    const v = await register(probe, "probe", path);
    const saved = {
      format: 3,
      next: { m: 2 },
      versions: [
        {
          name: "m",
          version: 1,
          createdAt: v.createdAt,
          files: v.files,
          tensors: v.tensors.map((t) => ({ ...t, hash: "0123456789abcdef" })),
        },
      ],
    };
    writeFileSync(registryFile(stateDir), JSON.stringify(saved));
    const after = newRegistry(stateDir);
    const report = await restoreRegistry(stateDir, after, silent);
    expect(report).toEqual({
      restored: [],
      notRestored: [{ id: "m@1", reason: 'tensor "a" no longer has the hash it was registered with' }],
    });
  });

  it("restores a version saved with plain XXH64 hashes (format 1) when its files are unchanged, hashing anew", async () => {
    const stateDir = tempDir();
    const path = model();
    const probe = newRegistry(tempDir());
    const v = await register(probe, "probe", path);
    const version = { name: "m", version: 1, createdAt: v.createdAt, files: v.files };
    const oldHashes = v.tensors.map((t) => ({ ...t, hash: "0123456789abcdef" }));
    const saved = { format: 1, next: { m: 3 }, versions: [{ ...version, tensors: oldHashes }] };
    // m@2's file changed since: not restored, whatever the format.
    const changed = model();
    const w = await register(probe, "probe", changed);
    utimesSync(changed, new Date(), new Date(Date.now() - 3_600_000));
    saved.versions.push({ ...version, version: 2, files: w.files, tensors: oldHashes });
    writeFileSync(registryFile(stateDir), JSON.stringify(saved));
    const after = newRegistry(stateDir);
    const report = await restoreRegistry(stateDir, after, silent);
    expect(report.restored).toEqual(["m@1"]);
    expect(report.notRestored).toEqual([
      { id: "m@2", reason: expect.stringMatching(/changed since it was registered/) },
    ]);
    expect(after.get("m@1").tensors.map((t) => t.hash)).toEqual(v.tensors.map((t) => t.hash));
  });

  it("starts empty, reporting nothing, when there is no registry.json", async () => {
    const stateDir = tempDir();
    const registry = newRegistry(stateDir);
    expect(await restoreRegistry(stateDir, registry, silent)).toEqual({ restored: [], notRestored: [] });
    expect(registry.list()).toEqual([]);
  });

  it("starts empty, reporting why, when registry.json cannot be read", async () => {
    const stateDir = tempDir();
    writeFileSync(registryFile(stateDir), "{ not json");
    const registry = newRegistry(stateDir);
    const report = await restoreRegistry(stateDir, registry, silent);
    expect(report.restored).toEqual([]);
    expect(report.notRestored).toHaveLength(1);
    expect(report.notRestored[0]?.id).toBe("*");
    expect(report.notRestored[0]?.reason).toMatch(/^registry\.json unreadable: .*JSON/);
    expect(registry.list()).toEqual([]);
  });

  it("keeps the next numbers of a file that lists no versions", async () => {
    const stateDir = tempDir();
    writeFileSync(registryFile(stateDir), JSON.stringify({ format: 1, next: { m: 4 } }));
    const registry = newRegistry(stateDir);
    expect(await restoreRegistry(stateDir, registry, silent)).toEqual({ restored: [], notRestored: [] });
    expect(registry.nextVersions()).toEqual({ m: 4 });
    expect((await register(registry, "m", model())).id).toBe("m@4");
  });
});
