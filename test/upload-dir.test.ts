/**
 * Issue 10: the upload directory is the daemon's own (a pre-created one that is not stops
 * the start), and what uploads staged before a SIGKILL is removed at the next start.
 */
import { spawnSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import {
  chmodSync,
  chownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { type Config, ConfigError, defaults } from "../daemon/config/index.ts";
import { type Daemon, startDaemon } from "../daemon/daemon.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, daemonCommand, early, ROOT, removeTempDirs, startProcess, tempDir, testCredentials } from "./helpers.ts";

const LIB_DIR = new URL("../cuda-lib/build/", import.meta.url).pathname;
const NOBODY = 65534;
const running: Daemon[] = [];
const cleanup: (() => void)[] = [];

afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
  for (const f of cleanup.splice(0)) f();
  removeTempDirs();
});

async function start(overrides: Partial<Config> = {}, nodeId = "t") {
  const config: Config = {
    ...defaults({}),
    port: 0,
    backend: "host",
    stateDir: tempDir(),
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
    ioThreads: 2,
    ...testCredentials(),
    ...overrides,
  };
  const daemon = await startDaemon({
    config,
    runtime: nodeRuntime,
    log: pino({ level: "silent" }),
    nodeId,
    libDir: LIB_DIR,
  });
  running.push(daemon);
  return { daemon, config, api: client(`http://127.0.0.1:${daemon.port}`) };
}

function client(base: string) {
  return async (method: string, path: string, body?: unknown) => {
    const binary = body instanceof Uint8Array;
    const res = await fetch(base + path, {
      method,
      headers: {
        ...AUTH,
        ...(body ? { "content-type": binary ? "application/octet-stream" : "application/json" } : {}),
      },
      body: binary ? body.slice() : body ? JSON.stringify(body) : undefined,
    });
    // biome-ignore lint/suspicious/noExplicitAny: checked field by field
    return { status: res.status, body: (await res.json()) as any };
  };
}

describe("the upload directory", () => {
  it("is made per node, 0700, under /dev/shm by default, and said in /v1/status", async () => {
    const nodeId = `test-${randomUUID()}`;
    const dir = `/dev/shm/ckptd-${nodeId}`;
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const { api } = await start({ uploadDir: "" }, nodeId);
    expect(statSync(dir).mode & 0o7777).toBe(0o700);
    expect((await api("GET", "/v1/status")).body.uploads).toEqual({ dir, orphansRemoved: [] });
  });

  it("is 0770 and sticky with uploadGroup, of that group", async () => {
    const parent = tempDir("ckptd-test-", "/dev/shm");
    const dir = join(parent, "uploads");
    await start({ uploadDir: dir, uploadGroup: "nogroup" });
    const st = statSync(dir);
    expect([st.mode & 0o7777, st.uid, st.gid]).toEqual([0o1770, 0, NOBODY]);
  });

  it("writes a streamed file to a new file, not through a symlink planted under its name", async () => {
    const { api, config } = await start({ uploadGroup: "nogroup" });
    const victim = join(tempDir(), "victim");
    writeFileSync(victim, "precious");
    const { id } = (await api("POST", "/v1/uploads", { name: "p" })).body;
    const staged = join(config.uploadDir, `${id}-model.safetensors`);
    symlinkSync(victim, staged); // as a member of the group could
    const file = writeSafetensors(join(tempDir(), "f.safetensors"), [{ name: "f", dtype: "U8", shape: [16] }])[0];
    const put = await api("PUT", `/v1/uploads/${id}/files/model.safetensors`, readFileSync(file?.file as string));
    expect(put.status).toBe(200);
    expect(readFileSync(victim, "utf8")).toBe("precious");
    expect(lstatSync(staged).isFile()).toBe(true);
  });

  const refusals: [string, (dir: string) => void, string][] = [
    [
      "owned by another user",
      (dir) => chownSync(dir, NOBODY, NOBODY),
      `is owned by uid ${NOBODY}, not by the daemon's user (uid 0)`,
    ],
    ["writable by every user", (dir) => chmodSync(dir, 0o777), "is writable by every user (mode 777)"],
    [
      "writable by its group, without uploadGroup",
      (dir) => chmodSync(dir, 0o770),
      "is writable by group 0, which is not uploadGroup (mode 770)",
    ],
  ];

  it.each(refusals)(
    "stops the daemon at start (exit 2, one line naming it) when pre-created %s",
    async (_, spoil, why) => {
      const dir = join(tempDir("ckptd-test-", "/dev/shm"), "uploads");
      mkdirSync(dir, { mode: 0o700 });
      spoil(dir);
      const { tokensFile, clusterSecretFile } = testCredentials();
      const args = ["--port", "0", "--state-dir", tempDir(), "--upload-dir", dir, "--tokens-file", tokensFile];
      const [cmd, base] = daemonCommand("node");
      // Bounded: a daemon that starts after all is killed, not left running.
      const res = spawnSync(cmd, [...base, ...args, "--cluster-secret-file", clusterSecretFile], {
        cwd: ROOT,
        encoding: "utf8",
        timeout: 15_000,
      });
      expect(res.status).toBe(2);
      expect(res.stderr).toBe(`ckptd: config: uploadDir ${dir}: ${why}; remove it or choose another uploadDir\n`);
    },
  );

  it("refuses one in a directory others may write to", async () => {
    const parent = tempDir("ckptd-test-", "/dev/shm");
    chmodSync(parent, 0o777);
    const err = await start({ uploadDir: join(parent, "uploads") }).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe(
      `uploadDir ${parent}/uploads: is in ${parent}, which others may write to (and is not sticky); remove it or choose another uploadDir`,
    );
    expect(readdirSync(parent)).toEqual([]); // refused before anything was made there
  });

  it("refuses one further down a tree that others may write to", async () => {
    const top = tempDir("ckptd-test-", "/dev/shm");
    mkdirSync(join(top, "team"), { mode: 0o755 });
    chmodSync(top, 0o777);
    const dir = join(top, "team", "uploads");
    const err = await start({ uploadDir: dir }).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe(
      `uploadDir ${dir}: is in ${top}, which others may write to (and is not sticky); remove it or choose another uploadDir`,
    );
  });

  it("refuses a symlink in its place, and an unknown uploadGroup", async () => {
    const parent = tempDir("ckptd-test-", "/dev/shm");
    symlinkSync(tempDir(), join(parent, "uploads"));
    const err = await start({ uploadDir: join(parent, "uploads") }).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe(`uploadDir ${parent}/uploads: is a symlink; remove it or choose another uploadDir`);
    const group = await start({ uploadGroup: "no-such-group-here" }).catch((e) => e);
    expect(group.message).toBe('uploadGroup: no group "no-such-group-here" in /etc/group');
  });
});

describe("orphans", () => {
  it("removes at start what uploads staged before a SIGKILL, and reports it; keeps versions' and others' files", async () => {
    const uploadDir = tempDir("ckptd-test-", "/dev/shm");
    const stateDir = tempDir();
    const args = ["--upload-dir", uploadDir, "--host-devices", "1", "--backend", "host"];
    const first = await startProcess(daemonCommand("node"), args, {}, { stateDir });
    const api = client(first.url);
    const declared = await api("POST", "/v1/uploads", {
      name: "p",
      tensors: [{ name: "w", dtype: "F32", shape: [1024, 256] }],
    });
    const streamed = (await api("POST", "/v1/uploads", { name: "q" })).body.id;
    const file = writeSafetensors(join(tempDir(), "f.safetensors"), [{ name: "f", dtype: "U8", shape: [4096] }])[0];
    const bytes = new Uint8Array(readFileSync(file?.file as string));
    expect((await api("PUT", `/v1/uploads/${streamed}/files/x.safetensors`, bytes)).status).toBe(200);
    const committed = (
      await api("POST", "/v1/uploads", { name: "c", tensors: [{ name: "w", dtype: "U8", shape: [8] }] })
    ).body.id;
    expect((await api("PUT", `/v1/uploads/${committed}/tensors/w`, new Uint8Array(8))).status).toBe(200);
    expect((await api("POST", `/v1/uploads/${committed}/commit`)).status).toBe(201);
    // A trainer's file to adopt, and a staging-like name that is not the daemon's: neither is touched.
    writeSafetensors(join(uploadDir, "policy.safetensors"), [{ name: "w", dtype: "U8", shape: [8] }]);
    const foreign = join(uploadDir, "0123456789abcdef-tensors.safetensors");
    writeFileSync(foreign, "x");
    chownSync(foreign, NOBODY, NOBODY);
    first.proc.kill("SIGKILL");
    await first.exited;

    const staged = [`${declared.body.id}-tensors.safetensors`, `${streamed}-x.safetensors`].map((n) =>
      join(uploadDir, n),
    );
    const orphans = staged.map((f) => ({ file: f, bytes: statSync(f).size }));
    expect(orphans[1]?.bytes).toBe(bytes.byteLength);
    const second = await startProcess(daemonCommand("node"), args, {}, { stateDir });
    const status = (await client(second.url)("GET", "/v1/status")).body;
    second.proc.kill("SIGTERM");
    await second.exited;
    const byFile = (a: { file: string }, b: { file: string }) => a.file.localeCompare(b.file);
    expect([...status.uploads.orphansRemoved].sort(byFile)).toEqual(orphans.sort(byFile));
    expect(status.checkpoints.restore).toEqual({ restored: ["c@1"], notRestored: [] });
    expect(readdirSync(uploadDir).sort()).toEqual(
      [`${committed}-tensors.safetensors`, "0123456789abcdef-tensors.safetensors", "policy.safetensors"].sort(),
    );
  });

  it.each([
    [
      "[2**40, 2**40] bytes",
      [{ name: "w", dtype: "U8", shape: [2 ** 40, 2 ** 40] }],
      /^shape \[1099511627776,1099511627776\] of U8 is 1208925819614629174706176 bytes, more than 2\^53 - 1$/,
    ],
    [
      "two tensors of 2^52 bytes",
      [
        { name: "a", dtype: "U8", shape: [2 ** 52] },
        { name: "b", dtype: "U8", shape: [2 ** 52] },
      ],
      /^the upload is 9007199254741\d{3} bytes, more than 2\^53 - 1$/,
    ],
  ])("refuses a declared shape of %s with a 400, and stages nothing", async (_, tensors, message) => {
    const { api, config } = await start({ pinnedBudgetBytes: 0 });
    const res = await api("POST", "/v1/uploads", { name: "big", tensors });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toMatch(message);
    expect(readdirSync(config.uploadDir)).toEqual([]);
    expect((await api("GET", "/v1/uploads")).body.uploads).toEqual([]);
  });
});

/** A tmpfs of `size` mounted on a fresh directory (root only), unmounted after the test. */
function smallTmpfs(size: string): string | undefined {
  const dir = tempDir();
  if (spawnSync("mount", ["-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", dir]).status !== 0) return undefined;
  cleanup.push(() => spawnSync("umount", ["--lazy", dir])); // even if something still holds it
  return dir;
}

describe("a full upload directory", () => {
  it("answers 507 naming the directory, keeps nothing of a file, and takes uploads again once freed", async () => {
    const mount = smallTmpfs("4m");
    expect(mount, "mounting a tmpfs needs root").toBeDefined();
    const uploadDir = join(mount as string, "uploads");
    const { api, daemon } = await start({ uploadDir });
    const big = await api("POST", "/v1/uploads", {
      name: "big",
      tensors: [{ name: "w", dtype: "F32", shape: [1536, 1024] }],
    });
    expect(big.status).toBe(201);
    const octets = { "content-type": "application/octet-stream" };
    const sixMiB = Array.from({ length: 96 }, () => new Uint8Array(64 << 10));
    const tensor = await early(daemon.port, "PUT", `/v1/uploads/${big.body.id}/tensors/w`, octets, sixMiB);
    expect(tensor.status).toBe(507);
    expect(tensor.body.error).toEqual({
      code: "upload_dir_full",
      message: `the upload directory ${uploadDir} is full (ENOSPC) while writing tensor "w" (not written; the upload keeps its staging file); free space there or delete uploads in progress`,
    });
    expect((await api("POST", `/v1/uploads/${big.body.id}/commit`)).status).toBe(400); // w is not written
    expect((await api("DELETE", `/v1/uploads/${big.body.id}`)).status).toBe(200);
    const other = await api("POST", "/v1/uploads", { name: "f" });
    const file = await early(daemon.port, "PUT", `/v1/uploads/${other.body.id}/files/m.safetensors`, octets, sixMiB);
    expect(file.status).toBe(507);
    expect(file.body.error.message).toContain('while writing file "m.safetensors" (nothing of it was kept)');
    expect(readdirSync(uploadDir)).toEqual([]);
    const small = await api("POST", "/v1/uploads", { name: "s", tensors: [{ name: "w", dtype: "F32", shape: [4] }] });
    expect((await api("PUT", `/v1/uploads/${small.body.id}/tensors/w`, new Uint8Array(16))).status).toBe(200);
    expect((await api("POST", `/v1/uploads/${small.body.id}/commit`)).status).toBe(201);
  });
});
