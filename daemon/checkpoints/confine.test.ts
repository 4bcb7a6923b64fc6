import { chmodSync, chownSync, linkSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir } from "../../test/helpers.ts";
import type { DaemonError } from "../errors.ts";
import { FilePolicy, findGroup, isInside, lookupGroup } from "./confine.ts";

describe("isInside", () => {
  it.each([
    ["/dev/shm", "/dev/shm", true],
    ["/dev/shm/a/b", "/dev/shm", true],
    ["/dev/shmx/a", "/dev/shm", false],
    ["/dev", "/dev/shm", false],
    ["/etc/shadow", "/", true],
    ["/dev/shm/a", "/dev/shm/", true],
  ])("%s under %s: %s", (path, root, inside) => {
    expect(isInside(path, root)).toBe(inside);
  });
});

describe("findGroup", () => {
  const groups = "# comment\nroot:x:0:\ntrainers:x:1500:alice,bob\nempty:x:1600:\n";
  const passwd =
    "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/h:/bin/sh\nbob:x:1002:1002::/h:/bin/sh\ncarol:x:1003:1500::/h:/bin/sh\ndave:x:1004:1004::/h:/bin/sh\n";

  it("lists the group's named users and those whose primary group it is", () => {
    expect(findGroup("trainers", groups, passwd)).toEqual({
      name: "trainers",
      gid: 1500,
      members: new Set([1001, 1002, 1003]),
    });
  });

  it("finds a group by number, and one without members", () => {
    expect(findGroup("1500", groups, passwd)?.name).toBe("trainers");
    expect(findGroup("empty", groups, passwd)).toEqual({ name: "empty", gid: 1600, members: new Set() });
  });

  it("does not find a name that is not there; takes a number as it is", () => {
    expect(findGroup("staff", groups, passwd)).toBeUndefined();
    expect(findGroup("1004", groups, passwd)).toEqual({ name: "1004", gid: 1004, members: new Set([1004]) });
  });
});

describe("findGroup, more", () => {
  const groups = "trainers:x:1500:alice\nbroken:x:abc:alice\n#x:x:1700:alice\n";
  const passwd = "alice:x:1001:1001::/h:/bin/sh\nweird:x:nope:1500::/h:/bin/sh\nbob:x:1002:1500::/h:/bin/sh\n";

  it("skips comments, rows without a number, and users without one", () => {
    expect(findGroup("broken", groups, passwd)).toBeUndefined();
    expect(findGroup("#x", groups, passwd)).toBeUndefined();
    expect(findGroup("trainers", groups, passwd)?.members).toEqual(new Set([1001, 1002]));
  });

  it("does not take a name for a number, nor a number for a name", () => {
    expect(findGroup("alice", "1001:x:77:\n", passwd)).toBeUndefined();
    expect(findGroup("77", "1001:x:77:\n", passwd)?.name).toBe("1001");
    expect(findGroup("1500x", groups, passwd)).toBeUndefined();
  });

  it("reads the system's tables", async () => {
    expect((await lookupGroup("root"))?.gid).toBe(0);
    expect(await lookupGroup("no-such-group-here")).toBeUndefined();
  });
});

describe("FilePolicy.confine", () => {
  const UID = process.getuid?.() ?? 0;

  function setup() {
    const root = tempDir();
    const outside = tempDir();
    const uploads = tempDir();
    writeFileSync(join(root, "in.safetensors"), "x");
    writeFileSync(join(outside, "out.safetensors"), "x");
    const policy = new FilePolicy({ roots: [root, `${root}/`, "/no/such/root"], uploadDir: uploads, uid: UID });
    return { root, outside, uploads, policy };
  }

  async function refusal(promise: Promise<unknown>) {
    try {
      await promise;
    } catch (err) {
      return err as DaemonError;
    }
    throw new Error("expected a refusal");
  }

  it("lists each root once, normalised, with the upload directory", () => {
    const { root, uploads, policy } = setup();
    expect(policy.roots).toEqual([root, "/no/such/root", uploads]);
  });

  it("takes files under a root or the upload directory, and the roots themselves", async () => {
    const { root, uploads, policy } = setup();
    writeFileSync(join(uploads, "up.safetensors"), "x");
    for (const p of [
      join(root, "in.safetensors"),
      root,
      join(uploads, "up.safetensors"),
      `${root}/a/../in.safetensors`,
    ]) {
      await expect(policy.confine(p)).resolves.toBeUndefined();
    }
  });

  it("leaves a relative path for the caller to refuse", async () => {
    await expect(setup().policy.confine("../../etc/passwd")).resolves.toBeUndefined();
  });

  it("refuses a file outside every root, naming the roots", async () => {
    const { root, outside, uploads, policy } = setup();
    const path = join(outside, "out.safetensors");
    const err = await refusal(policy.confine(`${root}/../${outside.split("/").pop()}/out.safetensors`));
    expect(err.code).toBe("forbidden_path");
    expect(err.message).toBe(
      `${path} is outside every root; registrations may only name files under ${root}, /no/such/root, ${uploads} (registerRoots)`,
    );
    expect(err.details).toEqual({ path, registerRoots: [root, "/no/such/root", uploads] });
  });

  it("refuses a symlink under a root that leads outside, saying where", async () => {
    const { root, outside, policy } = setup();
    const link = join(root, "link.safetensors");
    symlinkSync(join(outside, "out.safetensors"), link);
    const err = await refusal(policy.confine(link));
    expect(err.message).toMatch(
      new RegExp(`^${link} leads to ${join(outside, "out.safetensors")}, outside every root; `),
    );
  });

  it("judges a missing path by its nearest existing ancestor", async () => {
    const { root, outside, policy } = setup();
    await expect(policy.confine(join(root, "new", "deeper", "x.safetensors"))).resolves.toBeUndefined();
    const err = await refusal(policy.confine(join(outside, "new", "x.safetensors")));
    expect(err.message).toMatch(new RegExp(`^${join(outside, "new", "x.safetensors")} is outside every root; `));
    // An ancestor that is a symlink out of the roots is judged where it leads.
    symlinkSync(outside, join(root, "away"));
    expect((await refusal(policy.confine(join(root, "away", "new", "x.safetensors")))).code).toBe("forbidden_path");
  });

  it("follows a root that is a symlink to where it leads", async () => {
    const real = tempDir();
    writeFileSync(join(real, "a.safetensors"), "x");
    const link = join(tempDir(), "root");
    symlinkSync(real, link);
    const policy = new FilePolicy({ roots: [link], uploadDir: "/no/such/uploads", uid: UID });
    await expect(policy.confine(join(real, "a.safetensors"))).resolves.toBeUndefined();
    await expect(policy.confine(join(link, "a.safetensors"))).resolves.toBeUndefined();
  });
});

describe("FilePolicy.whyNotAdoptable", () => {
  const UID = process.getuid?.() ?? 0;
  const NOBODY = 65534;
  const trainers = { name: "trainers", gid: 4400, members: new Set([4321]) };

  function setup(uploadGroup?: typeof trainers) {
    const root = tempDir();
    const uploads = tempDir();
    const policy = new FilePolicy({ roots: [root], uploadDir: uploads, uid: UID, uploadGroup });
    const file = (dir: string, name: string, uid = UID, gid = 0) => {
      const path = join(dir, name);
      writeFileSync(path, "x");
      chownSync(path, uid, gid);
      return path;
    };
    return { root, uploads, policy, file };
  }

  it("allows the daemon's own regular file under a root", async () => {
    const { root, policy, file } = setup();
    expect(await policy.whyNotAdoptable(file(root, "a.safetensors"))).toBeUndefined();
    await expect(policy.checkAdoptable(join(root, "a.safetensors"))).resolves.toBeUndefined();
  });

  it("says why for each file it may not delete", async () => {
    const { root, uploads, policy, file } = setup();
    const a = file(root, "a.safetensors");
    const cases: [string, string][] = [];
    cases.push([join(root, "missing"), `ENOENT: no such file or directory, lstat '${join(root, "missing")}'`]);
    symlinkSync(a, join(root, "link"));
    cases.push([join(root, "link"), "it is a symlink"]);
    mkdirSync(join(root, "dir"));
    cases.push([join(root, "dir"), "it is not a regular file"]);
    const outside = tempDir();
    symlinkSync(root, join(outside, "via"));
    cases.push([join(outside, "via", "a.safetensors"), `its path goes through a symlink (the file is ${a})`]);
    cases.push([file(outside, "o.safetensors"), "it is outside every root"]);
    const twice = file(root, "twice.safetensors");
    linkSync(twice, join(root, "again.safetensors"));
    cases.push([twice, "it has 2 hard links (only a file's one name can be adopted)"]);
    cases.push([
      file(uploads, "theirs.safetensors", 4321, 4400),
      "it is owned by uid 4321, not by the daemon's user (uid 0)",
    ]);
    for (const [path, why] of cases) expect([path, await policy.whyNotAdoptable(path)]).toEqual([path, why]);
  });

  it("refuses a file below a directory another user could swap", async () => {
    const { root, policy, file } = setup();
    mkdirSync(join(root, "open"));
    chmodSync(join(root, "open"), 0o777);
    expect(await policy.whyNotAdoptable(file(join(root, "open"), "a.safetensors"))).toBe(
      `directory ${join(root, "open")} is writable by others (mode 777) and not sticky`,
    );
    mkdirSync(join(root, "sticky"));
    chmodSync(join(root, "sticky"), 0o1777);
    expect(await policy.whyNotAdoptable(file(join(root, "sticky"), "a.safetensors"))).toBeUndefined();
    mkdirSync(join(root, "group"));
    chmodSync(join(root, "group"), 0o770);
    expect(await policy.whyNotAdoptable(file(join(root, "group"), "a.safetensors"))).toBe(
      `directory ${join(root, "group")} is writable by others (mode 770) and not sticky`,
    );
    mkdirSync(join(root, "theirs"));
    chownSync(join(root, "theirs"), NOBODY, NOBODY);
    expect(await policy.whyNotAdoptable(file(join(root, "theirs"), "a.safetensors"))).toBe(
      `directory ${join(root, "theirs")} is owned by uid ${NOBODY}`,
    );
  });

  it("allows the upload group's files in the upload directory only", async () => {
    const { root, uploads, policy, file } = setup(trainers);
    expect(await policy.whyNotAdoptable(file(uploads, "member.safetensors", 4321, 1))).toBeUndefined();
    expect(await policy.whyNotAdoptable(file(uploads, "group.safetensors", 5555, 4400))).toBeUndefined();
    expect(await policy.whyNotAdoptable(file(uploads, "stranger.safetensors", 5555, 1))).toBe(
      "it is owned by uid 5555, not by the daemon's user (uid 0), nor by a member of group trainers in the upload directory",
    );
    expect(await policy.whyNotAdoptable(file(root, "member.safetensors", 4321, 4400))).toBe(
      "it is owned by uid 4321, not by the daemon's user (uid 0), nor by a member of group trainers in the upload directory",
    );
  });

  it("refuses at registration with the reason and the path", async () => {
    const { root, policy } = setup();
    const path = join(root, "missing.safetensors");
    const err = (await policy.checkAdoptable(path).catch((e) => e)) as DaemonError;
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`cannot adopt ${path}: ENOENT: no such file or directory, lstat '${path}'`);
    expect(err.details).toEqual({ path });
  });
});
