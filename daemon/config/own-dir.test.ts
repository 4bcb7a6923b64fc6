import { chmodSync, chownSync, lchownSync, mkdirSync, statSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir } from "../../test/helpers.ts";
import { prepareOwnDir } from "./own-dir.ts";

const uid = process.getuid?.() ?? 0;
const OTHER = 12345;
const prepare = (dir: string, extra: { mode?: number; gid?: number } = {}) =>
  prepareOwnDir({ key: "socketDir", dir, uid, mode: 0o700, groupKey: "engineGroup", ...extra });
const modeOf = (path: string) => statSync(path).mode & 0o7777;

/** A sticky, world-writable directory, as /tmp and /dev/shm are. */
function sticky(): string {
  const dir = tempDir();
  chmodSync(dir, 0o1777);
  return dir;
}

describe("prepareOwnDir", () => {
  it("makes the directory and its missing parents, with exactly the mode asked", async () => {
    const dir = join(tempDir(), "a", "b", "sockets");
    await prepare(dir, { mode: 0o710, gid: 65534 });
    expect([modeOf(dir), statSync(dir).gid, statSync(dir).uid]).toEqual([0o710, 65534, uid]);
    expect(modeOf(join(dir, ".."))).toBe(0o755);
  });

  it("keeps the mode of a directory that was there (it does not lock others out of it)", async () => {
    const dir = tempDir();
    chmodSync(dir, 0o755);
    await prepare(dir);
    expect(modeOf(dir)).toBe(0o755);
  });

  it("refuses a relative path", async () => {
    await expect(prepare("sockets")).rejects.toThrow("socketDir sockets: is not an absolute path");
  });

  it("refuses a path through a symlink another user owns, which they could point elsewhere", async () => {
    const top = sticky();
    const target = tempDir();
    const link = join(top, "ckptd");
    symlinkSync(target, link);
    lchownSync(link, OTHER, OTHER);
    await expect(prepare(join(link, "sockets"))).rejects.toThrow(
      `socketDir ${link}/sockets: is reached through the symlink ${link}, owned by uid ${OTHER}; remove it or choose another socketDir`,
    );
  });

  it("refuses a path whose symlink, though the daemon's, leads into another user's directory", async () => {
    const top = tempDir();
    const theirs = join(top, "alice");
    mkdirSync(join(theirs, "real"), { recursive: true });
    chownSync(theirs, OTHER, OTHER);
    const link = join(top, "link");
    symlinkSync(join(theirs, "real"), link);
    await expect(prepare(join(link, "sockets"))).rejects.toThrow(
      `socketDir ${link}/sockets: leads through ${theirs}, which is owned by uid ${OTHER}`,
    );
  });

  it("names the directory above that another user owns, or that others may write to", async () => {
    const top = tempDir();
    const theirs = join(top, "theirs");
    mkdirSync(theirs, { mode: 0o755 });
    chownSync(theirs, OTHER, OTHER);
    await expect(prepare(join(theirs, "sockets"))).rejects.toThrow(
      `socketDir ${theirs}/sockets: is in ${theirs}, which is owned by uid ${OTHER}`,
    );
    const open = join(top, "open");
    mkdirSync(open);
    chmodSync(open, 0o777);
    await expect(prepare(join(open, "sockets"))).rejects.toThrow(
      `is in ${open}, which others may write to (and is not sticky)`,
    );
    await expect(prepare(join(sticky(), "sockets"))).resolves.toBeUndefined();
  });

  it("refuses a directory that is a symlink, a file, another user's, or writable beyond its group", async () => {
    const top = tempDir();
    symlinkSync(tempDir(), join(top, "link"));
    await expect(prepare(join(top, "link"))).rejects.toThrow("is a symlink");
    const { writeFileSync } = await import("node:fs");
    writeFileSync(join(top, "file"), "");
    await expect(prepare(join(top, "file"))).rejects.toThrow("is not a directory");
    mkdirSync(join(top, "group"), { mode: 0o770 });
    chmodSync(join(top, "group"), 0o770);
    await expect(prepare(join(top, "group"))).rejects.toThrow(
      "is writable by group 0, which is not engineGroup (mode 770)",
    );
    await expect(prepare(join(top, "group"), { mode: 0o710, gid: 0 })).rejects.toThrow(
      "is writable by engineGroup (mode 770), which may not write there",
    );
  });
});
