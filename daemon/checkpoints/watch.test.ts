import { describe, expect, it } from "vitest";
import { CKPT_EFAULT, CkptError } from "../../ffi/index.ts";
import {
  assertUnchanged,
  changedUnderneath,
  faultedFile,
  firstStale,
  type Observed,
  type RegisteredFile,
  staleReason,
} from "./watch.ts";

const T = Date.UTC(2026, 11, 1, 9, 0, 0);
const file: RegisteredFile = { path: "/dev/shm/a.safetensors", size: 4096, mtimeMs: T, ino: 7, dev: 1, inPlace: true };
const same = { size: 4096, mtimeMs: T, ino: 7, dev: 1 };

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
  ];
  for (const [what, now, want] of cases) {
    it(what, () => {
      const got = staleReason(file, now);
      if (want === undefined) expect(got).toBeUndefined();
      else expect(got).toContain(want);
    });
  }

  it("does not compare inodes a record does not have", () => {
    const old = { ...file, ino: undefined, dev: undefined };
    expect(staleReason(old, { ...same, ino: 99, dev: 5 })).toBeUndefined();
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
