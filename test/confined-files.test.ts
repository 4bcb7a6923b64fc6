/**
 * Issue 10, as a hostile local user would try it: registrations name only files under
 * registerRoots (symlinks resolved), adopt deletes only what the daemon may delete, and no
 * error echoes the bytes of a file the caller might not be allowed to read.
 */

import { spawn } from "node:child_process";
import {
  chmodSync,
  chownSync,
  existsSync,
  linkSync,
  mkdirSync,
  readFileSync,
  renameSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { type Config, defaults } from "../daemon/config/index.ts";
import type { Daemon } from "../daemon/daemon.ts";
import { writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, removeTempDirs, tempDir, testCredentials } from "./helpers.ts";
import { startInProcess } from "./in-process.ts";

const NOBODY = 65534;
const running: Daemon[] = [];

afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
  removeTempDirs();
});

async function start(overrides: Partial<Config> = {}) {
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
  const daemon = await startInProcess(config);
  running.push(daemon);
  const api = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(`http://127.0.0.1:${daemon.port}${path}`, {
      method,
      headers: { ...AUTH, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    // biome-ignore lint/suspicious/noExplicitAny: checked field by field
    return { status: res.status, body: (await res.json()) as any };
  };
  return { daemon, api, config };
}

const model = (dir: string, name = "m.safetensors") =>
  writeSafetensors(join(dir, name), [{ name: "w", dtype: "U8", shape: [64] }])[0]?.file as string;

describe("files the caller may not read", () => {
  it("refuses another user's file that others may not read (the daemon would read it for the caller)", async () => {
    const { api, config } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const file = model(dir);
    chownSync(file, 12345, 12345);
    chmodSync(file, 0o600);
    const refused = await api("POST", "/v1/checkpoints", { name: "theirs", files: [file] });
    expect(refused.status).toBe(403);
    expect(refused.body.error).toMatchObject({
      code: "forbidden_path",
      message: `${file} is owned by uid 12345 and not readable by others (mode 0600): the daemon registers only files their owner lets others read, its own, or the upload group's`,
    });
    chmodSync(file, 0o640); // its group's, not the upload group's
    expect((await api("POST", "/v1/checkpoints", { name: "theirs", files: [file] })).status).toBe(403);
    chmodSync(file, 0o644); // its owner lets everyone read it
    expect((await api("POST", "/v1/checkpoints", { name: "theirs", files: [file] })).status).toBe(201);
    // Handed to the daemon in its upload directory: registered whatever its mode.
    const staged = model(config.uploadDir, "staged.safetensors");
    chownSync(staged, 12345, 12345);
    chmodSync(staged, 0o600);
    expect((await api("POST", "/v1/checkpoints", { name: "staged", files: [staged] })).status).toBe(201);
  });

  it("takes another user's file that the upload group may read", async () => {
    const { api } = await start({ uploadGroup: "nogroup" });
    const file = model(tempDir("ckptd-test-", "/dev/shm"));
    chownSync(file, 12345, NOBODY);
    chmodSync(file, 0o640);
    expect((await api("POST", "/v1/checkpoints", { name: "group", files: [file] })).status).toBe(201);
  });
});

describe("registrations name only files under registerRoots", () => {
  it("never registers the bytes of a file outside the roots through a symlink swapped during registration", async () => {
    const { api } = await start();
    const good = tempDir("ckptd-test-", "/dev/shm");
    const outside = tempDir(); // under /tmp
    model(good);
    model(outside);
    const goodHash = (
      await api("POST", "/v1/checkpoints", { name: "g", files: [join(good, "m.safetensors")], copy: true })
    ).body.tensors?.[0]?.hash as string | undefined;
    const manifest = await api("GET", "/v1/checkpoints/g");
    const expected = goodHash ?? (manifest.body.tensors[0].hash as string);
    const link = join(tempDir("ckptd-test-", "/dev/shm"), "link");
    // Another process flips the link between the two directories as fast as it can.
    const flipper = spawn("bash", ["-c", `while true; do ln -sfn ${good} ${link}; ln -sfn ${outside} ${link}; done`]);
    try {
      let ready = 0;
      // At least 40 tries, and on until one got through (a busy machine may flip unevenly).
      for (let i = 0; i < 400 && (i < 40 || ready === 0); i++) {
        const res = await api("POST", "/v1/checkpoints", {
          name: "s",
          files: [join(link, "m.safetensors")],
          copy: true,
        });
        if (res.status !== 201) continue;
        ready++;
        const got = await api("GET", `/v1/checkpoints/${res.body.id}`);
        expect(got.body.tensors[0].hash).toBe(expected);
        await api("DELETE", `/v1/checkpoints/${res.body.id}`);
      }
      expect(ready).toBeGreaterThan(0);
    } finally {
      flipper.kill("SIGKILL");
    }
  });

  it("refuses a file outside every root with a 403 naming the roots, and registers nothing", async () => {
    const { api, config } = await start(); // registerRoots: the default, /dev/shm
    const file = model(tempDir()); // under /tmp
    for (const body of [{ files: [file] }, { dir: join(file, "..") }, { files: ["/etc/shadow"] }, { dir: "/etc" }]) {
      const res = await api("POST", "/v1/checkpoints", { name: "x", ...body });
      expect(res.status).toBe(403);
      expect(res.body.error.code).toBe("forbidden_path");
      expect(res.body.error.message).toContain(`registrations may only name files under /dev/shm, ${config.uploadDir}`);
      expect(res.body.error.details.registerRoots).toEqual(["/dev/shm", config.uploadDir]);
    }
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("resolves symlinks: a link from /dev/shm to /etc, or to a file outside, is refused", async () => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    symlinkSync("/etc", join(dir, "etc"));
    symlinkSync("/etc/shadow", join(dir, "shadow.safetensors"));
    const outside = model(tempDir());
    symlinkSync(outside, join(dir, "model.safetensors"));
    const indexed = tempDir("ckptd-test-", "/dev/shm");
    const config = join(tempDir(), "config.json");
    writeFileSync(config, JSON.stringify({ weight_map: { "api-key-0123456789": "x/y" } }));
    symlinkSync(config, join(indexed, "model.safetensors.index.json"));
    const cases: [unknown, string][] = [
      [{ dir: join(dir, "etc") }, `${dir}/etc leads to /etc, outside every root`],
      [{ files: [join(dir, "etc", "shadow")] }, `${dir}/etc/shadow leads to /etc/shadow, outside every root`],
      [{ files: [join(dir, "shadow.safetensors")] }, "leads to /etc/shadow, outside every root"],
      [{ files: [join(dir, "model.safetensors")] }, `leads to ${outside}, outside every root`],
      // The directory is inside; the link in it is not.
      [{ dir }, `${dir}/model.safetensors leads to ${outside}`],
      // An index file linked to JSON elsewhere is not read (its keys would be quoted).
      [{ dir: indexed }, `${indexed}/model.safetensors.index.json leads to ${config}`],
    ];
    for (const [body, message] of cases) {
      const res = await api("POST", "/v1/checkpoints", { name: "x", ...(body as object) });
      expect(res.status).toBe(403);
      expect(res.body.error.message).toContain(message);
    }
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("takes a symlink that stays inside the roots, and files under a configured root", async () => {
    const extra = tempDir();
    const { api } = await start({ registerRoots: ["/dev/shm", extra] });
    const dir = tempDir("ckptd-test-", "/dev/shm");
    symlinkSync(model(dir, "real.safetensors"), join(dir, "link.safetensors"));
    expect((await api("POST", "/v1/checkpoints", { name: "a", files: [join(dir, "link.safetensors")] })).status).toBe(
      201,
    );
    expect((await api("POST", "/v1/checkpoints", { name: "b", files: [model(extra)] })).status).toBe(201);
  });

  it("does not restore a saved version whose files are no longer under the roots", async () => {
    const extra = tempDir();
    const stateDir = tempDir();
    const first = await start({ stateDir, registerRoots: [extra] });
    expect((await first.api("POST", "/v1/checkpoints", { name: "m", files: [model(extra)] })).status).toBe(201);
    await first.daemon.stop();
    const second = await start({ stateDir });
    const { restore } = (await second.api("GET", "/v1/status")).body.checkpoints;
    expect(restore.restored).toEqual([]);
    expect(restore.notRestored[0].reason).toMatch(/is outside every root; registrations may only name files under/);
  });
});

describe("no error echoes a file's contents", () => {
  // As root the daemon reads any file; the caller may not be allowed to.
  const secrets: [string, Uint8Array][] = [
    ["shadow-like text", new TextEncoder().encode("root:*:20000:0:99999:7:::\nalice:$6$salt$hash:20000::::::\n")],
    [
      "a plausible header length, then text",
      Buffer.concat([Buffer.from([24, 0, 0, 0, 0, 0, 0, 0]), Buffer.from("secret-token-abcdef-0123456789")]),
    ],
    [
      "a header of JSON that does not parse",
      Buffer.concat([Buffer.from([16, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{"pw":"hunter2x", tail')]),
    ],
  ];

  it.each(secrets)("%s", async (_, bytes) => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const file = join(dir, "s.safetensors");
    // Readable by others, so that it is parsed (one they may not read is refused before: 403).
    writeFileSync(file, bytes, { mode: 0o644 });
    chownSync(file, NOBODY, NOBODY);
    const res = await api("POST", "/v1/checkpoints", { name: "s", files: [file] });
    expect(res.status).toBe(400);
    const said = JSON.stringify(res.body);
    const text = Buffer.from(bytes).toString("latin1");
    // No run of 6 characters of the file, nor its first 8 bytes as a number, comes back.
    for (let i = 0; i + 6 <= text.length; i++)
      expect(said).not.toContain(JSON.stringify(text.slice(i, i + 6)).slice(1, -1));
    const head = Buffer.from(bytes).readBigUInt64LE(0);
    if (head > 1_000_000n) expect(said).not.toContain(head.toString());
  });

  it("says what is wrong with an index file without quoting it", async () => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeFileSync(join(dir, "model.safetensors.index.json"), "password=hunter2\n");
    const res = await api("POST", "/v1/checkpoints", { name: "s", dir });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toBe(`${dir}/model.safetensors.index.json: not valid JSON`);
  });
});

describe("adopt deletes only what the daemon may delete", () => {
  it("refuses at registration a file owned by another user, and leaves it", async () => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const file = model(dir);
    chownSync(file, NOBODY, NOBODY);
    const res = await api("POST", "/v1/checkpoints", { name: "x", files: [file], adopt: true });
    expect(res.status).toBe(400);
    expect(res.body.error).toMatchObject({
      code: "invalid_source",
      message: `cannot adopt ${file}: it is owned by uid ${NOBODY}, not by the daemon's user (uid 0)`,
    });
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
    // Registered without adopt, it is pinned and left alone when dropped.
    expect((await api("POST", "/v1/checkpoints", { name: "x", files: [file] })).status).toBe(201);
    await api("DELETE", "/v1/checkpoints/x");
    expect(existsSync(file)).toBe(true);
  });

  it("refuses to adopt from a directory another user could swap, or a file with two names", async () => {
    const { api } = await start();
    const refused = async (file: string, why: string) => {
      const res = await api("POST", "/v1/checkpoints", { name: "x", files: [file], adopt: true });
      expect(res.status).toBe(400);
      expect(res.body.error.message).toBe(`cannot adopt ${file}: ${why}`);
      expect(existsSync(file)).toBe(true);
    };
    // A directory of another user: renamed for a symlink between the checks and the unlink,
    // the daemon would delete a file elsewhere.
    const theirs = tempDir("ckptd-test-", "/dev/shm");
    const inTheirs = model(theirs);
    chownSync(theirs, NOBODY, NOBODY);
    await refused(inTheirs, `directory ${theirs} is owned by uid ${NOBODY}`);
    const open = tempDir("ckptd-test-", "/dev/shm");
    const inOpen = model(open);
    chmodSync(open, 0o777);
    await refused(inOpen, `directory ${open} is writable by others (mode 777) and not sticky`);
    const linked = tempDir("ckptd-test-", "/dev/shm");
    const once = model(linked);
    linkSync(once, join(linked, "second-name.safetensors"));
    await refused(once, "it has 2 hard links (only a file's one name can be adopted)");
    expect((await api("GET", "/v1/checkpoints")).body.checkpoints).toEqual([]);
  });

  it("refuses to adopt through a symlink, or a file outside the roots", async () => {
    const extra = tempDir();
    const { api } = await start({ registerRoots: ["/dev/shm", extra] });
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const real = model(dir, "real.safetensors");
    symlinkSync(real, join(dir, "link.safetensors"));
    symlinkSync(dir, join(extra, "shm"));
    const cases: [string, string][] = [
      [join(dir, "link.safetensors"), "it is a symlink"],
      [join(extra, "shm", "real.safetensors"), `its path goes through a symlink (the file is ${real})`],
    ];
    for (const [file, why] of cases) {
      const res = await api("POST", "/v1/checkpoints", { name: "x", files: [file], adopt: true });
      expect(res.status).toBe(400);
      expect(res.body.error.message).toBe(`cannot adopt ${file}: ${why}`);
    }
    expect(existsSync(real)).toBe(true);
  });

  it("leaves a file whose directory was swapped for a symlink after registration", async () => {
    const { api } = await start();
    const parent = tempDir("ckptd-test-", "/dev/shm");
    const dir = join(parent, "ckpt");
    mkdirSync(dir);
    const file = model(dir);
    expect((await api("POST", "/v1/checkpoints", { name: "x", files: [file], adopt: true })).status).toBe(201);
    // The victim: a file of the same name elsewhere, which DELETE must not reach.
    const victim = tempDir();
    const victimFile = model(victim);
    renameSync(dir, join(parent, "moved"));
    symlinkSync(victim, dir);
    expect((await api("DELETE", "/v1/checkpoints/x")).status).toBe(200);
    expect(existsSync(victimFile)).toBe(true);
    expect(existsSync(join(parent, "moved", "m.safetensors"))).toBe(true);
  });

  it("adopts a file of an uploadGroup member in the upload directory, nowhere else", async () => {
    const { api, config } = await start({ uploadGroup: "nogroup" });
    const inUploads = model(config.uploadDir, "trainer.safetensors");
    const elsewhere = model(tempDir("ckptd-test-", "/dev/shm"), "trainer.safetensors");
    for (const f of [inUploads, elsewhere]) chownSync(f, NOBODY, NOBODY);
    expect((await api("POST", "/v1/checkpoints", { name: "a", files: [inUploads], adopt: true })).status).toBe(201);
    const res = await api("POST", "/v1/checkpoints", { name: "b", files: [elsewhere], adopt: true });
    expect(res.status).toBe(400);
    expect(res.body.error.message).toBe(
      `cannot adopt ${elsewhere}: it is owned by uid ${NOBODY}, not by the daemon's user (uid 0), nor by a member of group nogroup in the upload directory`,
    );
    await api("DELETE", "/v1/checkpoints/a");
    expect(existsSync(inUploads)).toBe(false);
    expect(readFileSync(elsewhere).byteLength).toBeGreaterThan(0);
  });
});
