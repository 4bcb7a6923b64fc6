import { appendFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { CKPT_EFAULT, CkptError } from "../../ffi/index.ts";
import { tempDir, thrown } from "../../test/helpers.ts";
import type { DaemonError } from "../errors.ts";
import {
  assertUnchanged,
  changedUnderneath,
  checkFiles,
  faultedFile,
  firstStale,
  type Observed,
  observe,
  type RegisteredFile,
  replaced,
  staleReason,
  watchFiles,
} from "./watch.ts";

const T = Date.UTC(2026, 11, 1, 9, 0, 0);
const file: RegisteredFile = {
  path: "/dev/shm/a.safetensors",
  size: 4096,
  mtimeMs: T,
  ctimeMs: T,
  ino: 7,
  dev: 1,
  inPlace: true,
};
const same = { size: 4096, mtimeMs: T, ctimeMs: T, ino: 7, dev: 1 };

describe("staleReason", () => {
  const cases: [string, Observed, string | undefined][] = [
    ["unchanged", same, undefined],
    ["removed", { error: "ENOENT" }, "was removed"],
    ["unreadable", { error: "EACCES" }, "cannot be stat'ed (EACCES)"],
    ["replaced, same size and time", { ...same, ino: 8 }, "was replaced by another file (inode 8, registered 7)"],
    ["on another device", { ...same, dev: 2 }, "was replaced by another file (inode 7, registered 7)"],
    ["truncated", { ...same, size: 100 }, "was truncated to 100 bytes (registered with 4096)"],
    ["truncated to nothing, then touched", { ...same, size: 0, mtimeMs: T + 5 }, "was truncated to 0 bytes"],
    ["grown", { ...same, size: 8192 }, "grew to 8192 bytes (registered with 4096)"],
    ["rewritten in place", { ...same, mtimeMs: T + 0.5 }, "was modified at 2026-12-01T09:00:00.000Z"],
    ["mtime moved back", { ...same, mtimeMs: T - 1000 }, "was modified at 2026-12-01T08:59:59.000Z"],
    [
      "written, then its mtime put back",
      { ...same, ctimeMs: T + 2000 },
      "was changed at 2026-12-01T09:00:02.000Z (its status change time; registered at 2026-12-01T09:00:00.000Z)",
    ],
  ];
  for (const [what, now, want] of cases) {
    it(what, () => {
      const got = staleReason(file, now);
      if (want === undefined) expect(got).toBeUndefined();
      else expect(got).toContain(want);
    });
  }

  it("does not compare inodes or change times a record does not have", () => {
    const old = { ...file, ino: undefined, dev: undefined, ctimeMs: undefined };
    expect(staleReason(old, { ...same, ino: 99, dev: 5, ctimeMs: T + 1 })).toBeUndefined();
    expect(staleReason(old, { ...same, size: 1 })).toContain("truncated");
  });
});

describe("firstStale", () => {
  const b = { ...file, path: "/dev/shm/b.safetensors", ino: 9 };
  it("names the first in-place file that changed", () => {
    expect(firstStale([file, b], [same, { ...same, ino: 9, size: 1 }])).toEqual({
      file: b.path,
      reason: "was truncated to 1 bytes (registered with 4096)",
    });
    expect(firstStale([file, b], [same, { ...same, ino: 9 }])).toBeUndefined();
  });

  it("ignores files copied into pinned memory, and treats a missing stat as removed", () => {
    expect(firstStale([{ ...file, inPlace: false }], [{ error: "ENOENT" }])).toBeUndefined();
    expect(firstStale([file], [])).toEqual({ file: file.path, reason: "was removed" });
  });
});

describe("faultedFile and changedUnderneath", () => {
  const pinned = [
    { path: "/dev/shm/a", mem: { address: 0x7f0000000000n, len: 8192 } },
    { path: "/dev/shm/b", mem: { address: 0x7f0000100000n, len: 8192 } },
  ];
  const fault = (addr: string) =>
    new CkptError(
      "ckpt_event_wait",
      CKPT_EFAULT,
      "CKPT_EFAULT",
      "bus error",
      `event 0x1: work queued before it failed: copy of range 1 of 2 (src 0x7f0000100000, 8192 bytes): bus error at ${addr}, offset 4096 of the range`,
    );

  it("finds the file whose mapping holds the faulting address", () => {
    expect(faultedFile(fault("0x7f0000101000"), pinned)).toMatchObject({ file: "/dev/shm/b", offset: 4096 });
    expect(faultedFile(fault("0x7f0000102000"), pinned)).toBeUndefined(); // one past b's end
    expect(faultedFile(new Error("bus error at 0x7f0000101000"), pinned)).toBeUndefined();
    const other = new CkptError("x", -7, "CKPT_ESYS", "", "bus error at 0x7f0000101000");
    expect(faultedFile(other, pinned)).toBeUndefined();
  });

  it("marks the version stale and names the file, or passes other failures through", () => {
    const marked: string[] = [];
    const version = { pinned, markStale: (f: string, r: string) => marked.push(`${f} ${r}`) };
    const err = changedUnderneath(version, fault("0x7f0000000010")) as Error & { code: string };
    expect(err.code).toBe("stale");
    expect(err.message).toBe(
      "/dev/shm/a was truncated under its mapping while an update copied it (bus error at byte 16)",
    );
    expect(marked).toEqual([err.message]);
    const timeout = new Error("bucket 3 did not reach GPU 0 within 2000 ms");
    expect(changedUnderneath(version, timeout)).toBe(timeout);
    expect(marked).toHaveLength(1);
  });
});

describe("assertUnchanged", () => {
  const version = (state: string, files: RegisteredFile[] = []) => ({
    state,
    files,
    error: undefined as { message: string; details?: unknown } | undefined,
    markStale(file: string, reason: string) {
      this.state = "stale";
      this.error = { message: `${file} ${reason}`, details: { file, reason } };
    },
  });

  it("passes a ready version whose files are as registered, and one copied into memory", () => {
    expect(() => assertUnchanged(version("ready"))).not.toThrow();
    expect(() => assertUnchanged(version("ready", [{ ...file, inPlace: false }]))).not.toThrow();
  });

  it("throws naming the file for a version that went stale, or whose file is gone now", () => {
    const gone = version("ready", [{ ...file, path: "/dev/shm/ckptd-no-such-file" }]);
    expect(() => assertUnchanged(gone)).toThrow("/dev/shm/ckptd-no-such-file was removed while the update copied it");
    expect(gone.state).toBe("stale");
    const stale = version("stale");
    stale.error = { message: "/x was truncated to 1 bytes" };
    expect(() => assertUnchanged(stale)).toThrow("/x was truncated to 1 bytes while the update copied it");
  });
});

describe("staleReason, exactly", () => {
  it("gives both times of a file modified in place", () => {
    expect(staleReason(file, { ...same, mtimeMs: T + 1500 })).toBe(
      "was modified at 2026-12-01T09:00:01.500Z (registered at 2026-12-01T09:00:00.000Z)",
    );
  });

  it("judges the inode before the size, and the size before the time", () => {
    expect(staleReason(file, { ...same, ino: 8, size: 1, mtimeMs: T + 1 })).toBe(
      "was replaced by another file (inode 8, registered 7)",
    );
    expect(staleReason(file, { ...same, size: 1, mtimeMs: T + 1 })).toBe(
      "was truncated to 1 bytes (registered with 4096)",
    );
    expect(staleReason(file, { ...same, size: 5000, mtimeMs: T + 1 })).toBe(
      "grew to 5000 bytes (registered with 4096)",
    );
  });

  it("compares the device of a record that has one but no inode", () => {
    expect(staleReason({ ...file, ino: undefined }, { ...same, ino: 99 })).toBeUndefined();
    expect(staleReason({ ...file, ino: undefined }, { ...same, dev: 2 })).toMatch(/^was replaced by another file/);
  });
});

describe("on real files", () => {
  function registered(path: string, inPlace = true): RegisteredFile {
    const st = statSync(path);
    return { path, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino, dev: st.dev, inPlace };
  }

  it("observe stats a path, or says why it cannot", () => {
    const path = join(tempDir(), "a");
    writeFileSync(path, "12345");
    const st = statSync(path);
    expect(observe(path)).toEqual({ size: 5, mtimeMs: st.mtimeMs, ctimeMs: st.ctimeMs, ino: st.ino, dev: st.dev });
    expect(observe(join(tempDir(), "missing"))).toEqual({ error: "ENOENT" });
    expect(observe(join(path, "below"))).toEqual({ error: "ENOTDIR" });
  });

  it("checkFiles passes files as registered and names the first in-place one changed", () => {
    const dir = tempDir();
    const [a, b, c] = ["a", "b", "c"].map((n) => join(dir, n)) as [string, string, string];
    for (const p of [a, b, c]) writeFileSync(p, "1234");
    const files = [registered(a), registered(b, false), registered(c)];
    expect(checkFiles(files)).toBeUndefined();
    rmSync(b); // copied into memory: not looked at
    expect(checkFiles(files)).toBeUndefined();
    appendFileSync(c, "5");
    expect(checkFiles(files)).toEqual({ file: c, reason: "grew to 5 bytes (registered with 4)" });
  });

  it("replaced says whether the path names another file now", () => {
    const dir = tempDir();
    const path = join(dir, "a");
    writeFileSync(path, "1234");
    const rec = registered(path);
    expect(replaced(rec)).toBe(false);
    appendFileSync(path, "5"); // changed, but the same file
    expect(replaced(rec)).toBe(false);
    writeFileSync(join(dir, "b"), "1234");
    renameSync(join(dir, "b"), path);
    expect(replaced(rec)).toBe(true);
    expect(replaced({ ...rec, ino: undefined })).toBe(false); // an old record: not known
    expect(replaced({ ...registered(path), dev: (rec.dev ?? 0) + 1 })).toBe(true);
    rmSync(path);
    expect(replaced(rec)).toBe(false); // nothing there to spare
  });

  it("watchFiles calls back on a change to an in-place file until stopped, and skips the others", async () => {
    const dir = tempDir();
    const [a, b] = ["a", "b"].map((n) => join(dir, n)) as [string, string];
    writeFileSync(a, "1");
    writeFileSync(b, "1");
    const events: string[] = [];
    const stop = watchFiles(
      [registered(b, false), { ...registered(a), path: join(dir, "missing") }, registered(a)],
      () => events.push("event"),
    );
    const settle = () => new Promise((resolve) => setTimeout(resolve, 100));
    appendFileSync(b, "2");
    await settle();
    expect(events).toEqual([]);
    appendFileSync(a, "2");
    for (let i = 0; i < 20 && events.length === 0; i++) await settle();
    expect(events.length).toBeGreaterThan(0);
    stop();
    events.length = 0;
    appendFileSync(a, "3");
    await settle();
    expect(events).toEqual([]);
  });
});

describe("more of faultedFile and assertUnchanged", () => {
  const pinned = [{ path: "/dev/shm/a", mem: { address: 0x1000n, len: 16 } }];
  const efault = (detail: string) => new CkptError("ckpt_event_wait", CKPT_EFAULT, "CKPT_EFAULT", "bus error", detail);

  it("takes the first byte of a mapping as in it, with the detail", () => {
    expect(faultedFile(efault("copy: bus error at 0x1000"), pinned)).toEqual({
      file: "/dev/shm/a",
      offset: 0,
      detail: "copy: bus error at 0x1000",
    });
    expect(faultedFile(efault("copy: bus error at 0xfff"), pinned)).toBeUndefined();
    expect(faultedFile(efault("copy: bus error"), pinned)).toBeUndefined();
  });

  it("gives the stale error the file and the reason as details", () => {
    const err = changedUnderneath({ pinned, markStale() {} }, efault("bus error at 0x100f")) as DaemonError;
    expect(err.details).toEqual({
      file: "/dev/shm/a",
      reason: "was truncated under its mapping while an update copied it (bus error at byte 15)",
    });
  });

  it("stats nothing of a version not ready, and says a file changed when no error is kept", () => {
    const marked: string[] = [];
    const gone = { ...file, path: "/dev/shm/ckptd-no-such-file" };
    const registering = { state: "registering", files: [gone], markStale: (f: string) => marked.push(f) };
    expect(() => assertUnchanged(registering)).not.toThrow();
    expect(marked).toEqual([]);
    const stale = { state: "stale", files: [], markStale() {} };
    const err = thrown(() => assertUnchanged(stale));
    expect([err.code, err.message, err.details]).toEqual([
      "stale",
      "a file changed while the update copied it",
      undefined,
    ]);
    const withDetails = { ...stale, error: { message: "/x was removed", details: { file: "/x" } } };
    expect(thrown(() => assertUnchanged(withDetails)).details).toEqual({ file: "/x" });
  });
});
