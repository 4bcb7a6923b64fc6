import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import * as constants from "./constants.ts";
import { DEFAULT_HEADER, DEFAULT_OUT, parseHeader } from "./gen-constants.ts";
import { ABI_VERSION } from "./library.ts";

const SCRIPT = fileURLToPath(new URL("./gen-constants.ts", import.meta.url));
const header = readFileSync(DEFAULT_HEADER, "utf8");
const dir = mkdtempSync(join(tmpdir(), "ckpt-constants-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs the generator's freshness check of ffi/constants.ts against a header. */
function check(headerPath: string) {
  const run = spawnSync(process.execPath, ["--import", "tsx", SCRIPT, "--check", "--header", headerPath], {
    encoding: "utf8",
  });
  return { status: run.status, stderr: run.stderr };
}

describe("ffi/constants.ts, generated from ckpt.h", () => {
  it("holds every status of the header's table and its #define constants", () => {
    const parsed = parseHeader(header);
    const statuses = parsed.filter((c) => c.kind === "status");
    expect(statuses.length).toBe([...header.matchAll(/^\s*X\(/gm)].length);
    expect(parsed).toContainEqual({ name: "CKPT_EAGAIN", value: -9, kind: "status" });
    expect(parsed).toContainEqual({ name: "CKPT_COMM_ID_BYTES", value: 128, kind: "define" });
    for (const c of parsed) expect((constants as Record<string, number>)[c.name]).toBe(c.value);
  });

  it("is fresh against the header", () => {
    expect(check(DEFAULT_HEADER)).toEqual({ status: 0, stderr: "" });
  });

  it("is reported stale, naming what changed, when the header changes", () => {
    const before = readFileSync(DEFAULT_OUT, "utf8");
    const changed = header
      .replace("X(EAGAIN, -9,", "X(EAGAIN, -99,")
      .replace("#define CKPT_COMM_ID_BYTES 128", "#define CKPT_COMM_ID_BYTES 128\n#define CKPT_NEW_LIMIT 7");
    expect(changed).not.toBe(header);
    const path = join(dir, "ckpt.h");
    writeFileSync(path, changed);
    const { status, stderr } = check(path);
    expect(status).toBe(1);
    expect(stderr).toContain("CKPT_EAGAIN is -9, header says -99");
    expect(stderr).toContain("CKPT_NEW_LIMIT missing (header: 7)");
    expect(readFileSync(DEFAULT_OUT, "utf8")).toBe(before); // --check writes nothing
  });

  it("is reported stale when a constant leaves the header", () => {
    const path = join(dir, "removed.h");
    writeFileSync(path, header.replace(/^#define CKPT_IPC_HOST .*$/m, ""));
    const { status, stderr } = check(path);
    expect(status).toBe(1);
    expect(stderr).toContain("CKPT_IPC_HOST is no longer in the header");
  });

  it("agrees with the ABI the koffi declarations are written for", () => {
    // Raise ABI_VERSION in library.ts only together with the declarations it describes.
    expect(ABI_VERSION).toBe(constants.CKPT_ABI_VERSION);
  });
});
