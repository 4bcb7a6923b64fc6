import { randomUUID } from "node:crypto";
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir } from "../../test/helpers.ts";
import { ConfigError } from "../config/index.ts";
import type { Group } from "./confine.ts";
import { defaultUploadDir, openUploadArea, prepareUploadDir, removeOrphans, STAGING_FILE } from "./upload-dir.ts";

// The tests run as root (the daemon's usual user); NOBODY stands for another user.
const UID = process.getuid?.() ?? 0;
const NOBODY = 65534;
const group: Group = { name: "nogroup", gid: NOBODY, members: new Set() };

const modeOf = (path: string) => statSync(path).mode & 0o7777;

async function refusal(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error("expected a refusal");
}

/** The message prepareUploadDir refuses `dir` with. */
const refused = (dir: string, why: string) => `uploadDir ${dir}: ${why}; remove it or choose another uploadDir`;

function shmDir(): string {
  return tempDir("ckptd-test-", "/dev/shm");
}

describe("defaultUploadDir", () => {
  it("is per node under shared memory, else under the state directory", () => {
    expect(defaultUploadDir("n1", "/var/lib/ckptd", "/dev/shm")).toBe("/dev/shm/ckptd-n1");
    expect(defaultUploadDir("n1", "/var/lib/ckptd", undefined)).toBe("/var/lib/ckptd/uploads");
  });
});

describe("prepareUploadDir makes the directory", () => {
  it("0700 without a group, with missing parents 0755", async () => {
    const dir = join(shmDir(), "a", "b", "uploads");
    await prepareUploadDir(dir, UID);
    expect(modeOf(dir)).toBe(0o700);
    expect(modeOf(join(dir, ".."))).toBe(0o755);
    expect(statSync(dir).uid).toBe(UID);
  });

  it("01770 and of the group with one", async () => {
    const dir = join(shmDir(), "uploads");
    await prepareUploadDir(dir, UID, group);
    const st = statSync(dir);
    expect([st.mode & 0o7777, st.uid, st.gid]).toEqual([0o1770, UID, NOBODY]);
  });

  it("takes one that is there and the daemon's own, with what it holds, setting its mode", async () => {
    const dir = join(shmDir(), "uploads");
    mkdirSync(dir, { mode: 0o750 });
    chmodSync(dir, 0o750);
    writeFileSync(join(dir, "kept"), "x");
    await prepareUploadDir(dir, UID);
    expect(modeOf(dir) & 0o022).toBe(0); // writable by its owner only
    expect(readdirSync(dir)).toEqual(["kept"]);
  });

  it("sets the group and the mode on one that is there, with a group", async () => {
    const dir = join(shmDir(), "uploads");
    mkdirSync(dir, { mode: 0o700 });
    await prepareUploadDir(dir, UID, group);
    const st = statSync(dir);
    expect([st.mode & 0o7777, st.gid]).toEqual([0o1770, NOBODY]);
  });

  it("accepts one of the group that its members may write to", async () => {
    const dir = join(shmDir(), "uploads");
    mkdirSync(dir);
    chownSync(dir, UID, NOBODY);
    chmodSync(dir, 0o770);
    await prepareUploadDir(dir, UID, group);
    expect(modeOf(dir)).toBe(0o1770);
  });

  it("accepts a sticky directory above that others may write to (as /dev/shm is)", async () => {
    const parent = shmDir();
    chmodSync(parent, 0o1777);
    await prepareUploadDir(join(parent, "uploads"), UID);
    expect(modeOf(join(parent, "uploads"))).toBe(0o700);
  });
});

describe("prepareUploadDir refuses", () => {
  it.each([
    ["writable by its group", 0o775],
    ["writable by others", 0o757],
  ])("a directory above %s and not sticky, making nothing there", async (_case, mode) => {
    const parent = shmDir();
    chmodSync(parent, mode);
    const dir = join(parent, "uploads");
    const err = await refusal(prepareUploadDir(dir, UID));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe(refused(dir, `is in ${parent}, which others may write to (and is not sticky)`));
    expect(readdirSync(parent)).toEqual([]);
  });

  it("a directory above owned by another user", async () => {
    const parent = shmDir();
    chownSync(parent, NOBODY, NOBODY);
    const dir = join(parent, "uploads");
    const err = await refusal(prepareUploadDir(dir, UID));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message.startsWith(`uploadDir ${dir}: is in ${parent}, which `)).toBe(true);
    expect(readdirSync(parent)).toEqual([]);
  });

  it("nothing for being above or in the daemon's own directories when the daemon is not root", async () => {
    const parent = shmDir();
    chownSync(parent, NOBODY, NOBODY);
    const dir = join(parent, "uploads");
    mkdirSync(dir, { mode: 0o700 });
    chownSync(dir, NOBODY, NOBODY);
    await prepareUploadDir(dir, NOBODY);
    expect(modeOf(dir)).toBe(0o700);
  });

  it("a name it cannot create", async () => {
    const dir = join(shmDir(), "x".repeat(300));
    const err = await refusal(prepareUploadDir(dir, UID));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toMatch(new RegExp(`^uploadDir ${dir}: .*ENAMETOOLONG`));
  });

  it("a symlink, even to a good directory", async () => {
    const parent = shmDir();
    const target = join(parent, "real");
    mkdirSync(target, { mode: 0o700 });
    const dir = join(parent, "uploads");
    symlinkSync(target, dir);
    expect((await refusal(prepareUploadDir(dir, UID))).message).toBe(refused(dir, "is a symlink"));
  });

  it("a file", async () => {
    const dir = join(shmDir(), "uploads");
    writeFileSync(dir, "");
    expect((await refusal(prepareUploadDir(dir, UID))).message).toBe(refused(dir, "is not a directory"));
  });

  it("one owned by another user", async () => {
    const dir = join(shmDir(), "uploads");
    mkdirSync(dir, { mode: 0o700 });
    const err = await refusal(prepareUploadDir(dir, 4321));
    expect(err.message).toBe(refused(dir, `is owned by uid ${UID}, not by the daemon's user (uid 4321)`));
  });

  // The wording of the group rule is still settling (own-dir.ts): the directory, the group and
  // the mode are what the operator needs.
  it.each([
    [0o777, undefined, /^is writable by every user \(mode 777\)$/],
    [0o1777, group, /^is writable by every user \(mode 1777\)$/],
    [0o720, undefined, /^is writable by group 0\b.*\(mode 720\)/],
    [0o770, group, /^is writable by group 0\b.*\(mode 770\)/],
  ])("mode %s (group %j)", async (mode, g, why) => {
    const dir = join(shmDir(), "uploads");
    mkdirSync(dir);
    chownSync(dir, UID, 0);
    chmodSync(dir, mode);
    const err = await refusal(prepareUploadDir(dir, UID, g));
    expect(err).toBeInstanceOf(ConfigError);
    const prefix = `uploadDir ${dir}: `;
    const suffix = "; remove it or choose another uploadDir";
    expect(err.message.startsWith(prefix) && err.message.endsWith(suffix)).toBe(true);
    expect(err.message.slice(prefix.length, -suffix.length)).toMatch(why);
    expect(modeOf(dir)).toBe(mode); // left as it was
  });
});

describe("removeOrphans", () => {
  const id = "0123456789abcdef";

  it("removes the daemon's staging files no version holds, and says which with their sizes", async () => {
    const dir = shmDir();
    const orphan = join(dir, `${id}-tensors.safetensors`);
    const other = join(dir, `fedcba9876543210-model.v2_x.safetensors`);
    const kept = join(dir, `${"a".repeat(16)}-tensors.safetensors`);
    writeFileSync(orphan, "12345");
    writeFileSync(other, "1");
    writeFileSync(kept, "kept");
    const removed = await removeOrphans(dir, UID, new Set([kept]));
    expect(removed.sort((a, b) => a.file.localeCompare(b.file))).toEqual(
      [
        { file: orphan, bytes: 5 },
        { file: other, bytes: 1 },
      ].sort((a, b) => a.file.localeCompare(b.file)),
    );
    expect(readdirSync(dir)).toEqual([`${"a".repeat(16)}-tensors.safetensors`]);
  });

  it("leaves other names, other owners, directories and symlinks alone", async () => {
    const dir = shmDir();
    const names = [
      "policy.safetensors",
      "0123456789ABCDEF-tensors.safetensors", // not the daemon's lower-case ids
      "0123456789abcde-tensors.safetensors", // 15 digits
      `${id}-tensors.safetensors.tmp`,
      `x${id}-tensors.safetensors`,
      `${id}-a b.safetensors`,
    ];
    for (const n of names) writeFileSync(join(dir, n), "x");
    const foreign = `${id}-foreign.safetensors`;
    writeFileSync(join(dir, foreign), "x");
    chownSync(join(dir, foreign), NOBODY, NOBODY);
    const sub = `${id}-dir.safetensors`;
    mkdirSync(join(dir, sub));
    const target = join(tempDir(), "target");
    writeFileSync(target, "precious");
    const link = `${id}-link.safetensors`;
    symlinkSync(target, join(dir, link));
    expect(await removeOrphans(dir, UID, new Set())).toEqual([]);
    expect(readdirSync(dir).sort()).toEqual([...names, foreign, sub, link].sort());
    expect(lstatSync(join(dir, link)).isSymbolicLink()).toBe(true);
    expect(existsSync(target)).toBe(true);
  });

  it("matches the names uploads.ts gives its staging files", () => {
    expect(STAGING_FILE.test(`${id}-tensors.safetensors`)).toBe(true);
    expect(STAGING_FILE.test(`${id}-tensors.safetensors\nx`)).toBe(false);
  });
});

describe("openUploadArea", () => {
  const config = { uploadGroup: "", registerRoots: ["/dev/shm"], stateDir: "/nonexistent/state" };

  it("makes the per-node directory under /dev/shm when none is configured", async () => {
    const nodeId = `test-${randomUUID()}`;
    const dir = `/dev/shm/ckptd-${nodeId}`;
    try {
      const area = await openUploadArea({ ...config, uploadDir: "" }, nodeId);
      expect(area).toMatchObject({ dir, uid: UID, orphansRemoved: [] });
      expect(modeOf(dir)).toBe(0o700);
      expect(area.files.roots).toEqual(["/dev/shm", dir]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("names the directory by its real path, and lets the upload group adopt there", async () => {
    const real = shmDir();
    const link = join(tempDir(), "link");
    symlinkSync(real, link);
    const area = await openUploadArea({ ...config, uploadDir: join(link, "uploads"), uploadGroup: "nogroup" }, "n");
    expect(area.dir).toBe(join(real, "uploads"));
    expect(statSync(area.dir).gid).toBe(NOBODY);
    // A file a member of the group left in the upload directory may be adopted.
    const staged = join(area.dir, "policy.safetensors");
    writeFileSync(staged, "x");
    chownSync(staged, 4321, NOBODY);
    expect(await area.files.whyNotAdoptable(staged)).toBeUndefined();
  });

  it("refuses an unknown upload group before making anything", async () => {
    const parent = shmDir();
    const err = await refusal(
      openUploadArea({ ...config, uploadDir: join(parent, "u"), uploadGroup: "no-such-group" }, "n"),
    );
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.message).toBe('uploadGroup: no group "no-such-group" in /etc/group');
    expect(readdirSync(parent)).toEqual([]);
  });
});
