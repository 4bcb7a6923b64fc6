/**
 * Around the whole run: anything a test leaves in /dev/shm (RAM) or a ckptd-test-* directory
 * in the temp directory fails the run, naming what was left.
 */
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";

function entries(): Set<string> {
  const shm = readdirSync("/dev/shm").map((n) => `/dev/shm/${n}`);
  const tmp = readdirSync(tmpdir())
    .filter((n) => n.startsWith("ckptd-test-"))
    .map((n) => `${tmpdir()}/${n}`);
  return new Set([...shm, ...tmp]);
}

export default function setup(): () => void {
  const before = entries();
  return () => {
    const left = [...entries()].filter((e) => !before.has(e));
    if (left.length > 0)
      throw new Error(`the tests left ${left.length} entries behind: ${left.slice(0, 20).join(", ")}`);
  };
}
