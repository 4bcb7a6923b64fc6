/**
 * Native parts of the single binary: koffi's module and the libckpt libraries travel as SEA
 * assets and are written once to a private directory named by their content hash.
 */
import { createHash } from "node:crypto";
import { lstatSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { getAsset } from "node:sea";

/** Asset keys, as build.sh names them in the SEA configuration. */
export const NATIVE_ASSETS = ["koffi.node", "libckpt-host.so", "libckpt-cuda.so"];

let extracted: string | undefined;

function privateBase(): string {
  const base = process.env.XDG_RUNTIME_DIR || join(tmpdir(), `ckptd-${process.getuid?.() ?? "user"}`);
  const dir = join(base, "ckptd-native");
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  // Another user's directory or a symlink there could hand us foreign code to load.
  if (!st.isDirectory() || (process.getuid && st.uid !== process.getuid()) || (st.mode & 0o077) !== 0) {
    throw new Error(`${dir} is not a private directory of this user (mode 0700); remove it`);
  }
  return dir;
}

/** Extracts the native assets (once) and returns their directory. */
export function extractNative(): string {
  if (extracted) return extracted;
  const assets: [string, Uint8Array][] = [];
  const hash = createHash("sha256");
  for (const name of NATIVE_ASSETS) {
    let bytes: Uint8Array;
    try {
      bytes = new Uint8Array(getAsset(name));
    } catch {
      continue; // libckpt-cuda.so is absent from binaries built without nvcc
    }
    assets.push([name, bytes]);
    hash.update(name).update(bytes);
  }
  const base = privateBase();
  const dir = join(base, hash.digest("hex").slice(0, 16));
  try {
    lstatSync(dir);
  } catch {
    const tmp = mkdtempSync(join(base, "tmp-"));
    for (const [name, bytes] of assets) writeFileSync(join(tmp, name), bytes, { mode: 0o500 });
    try {
      renameSync(tmp, dir);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      // Another ckptd extracting the same content won the race; its copy is identical.
      if ((err as NodeJS.ErrnoException).code !== "ENOTEMPTY" && (err as NodeJS.ErrnoException).code !== "EEXIST") {
        throw err;
      }
    }
  }
  extracted = dir;
  return dir;
}

/** Loads koffi's native module from the extracted copy (SEA's require only knows built-ins). */
export function loadKoffiNative(): unknown {
  const module = { exports: {} };
  process.dlopen(module, join(extractNative(), "koffi.node"));
  return module.exports;
}
