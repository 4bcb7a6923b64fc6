import { randomUUID } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** The node's stable id: made once, kept in the state directory. */
export function loadNodeId(stateDir: string): string {
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const path = join(stateDir, "node-id");
  try {
    const id = readFileSync(path, "utf8").trim();
    if (id) return id;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  const id = randomUUID();
  writeFileSync(`${path}.tmp`, `${id}\n`, { mode: 0o600 });
  renameSync(`${path}.tmp`, path);
  return id;
}
