import { describe, expect, it } from "vitest";
import { findGroup, isInside } from "./confine.ts";

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
