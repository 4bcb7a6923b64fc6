/**
 * Around the whole run: anything a test leaves in /dev/shm (RAM) or a ckptd-test-* directory
 * in the temp directory fails the run, naming what was left. Test directories carry the run's
 * tag (test/helpers.ts tempDir), so that another run or a benchmark on the same machine at
 * the same time is not taken for a leak.
 */
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename } from "node:path";

function entries(): Set<string> {
  const shm = readdirSync("/dev/shm").map((n) => `/dev/shm/${n}`);
  const tmp = readdirSync(tmpdir())
    .filter((n) => n.startsWith("ckptd-test-"))
    .map((n) => `${tmpdir()}/${n}`);
  return new Set([...shm, ...tmp]);
}

/** Whether `entry` belongs to another test run (another tag, or none) or to a benchmark. */
function someoneElses(entry: string, tag: string): boolean {
  const name = basename(entry);
  return (name.startsWith("ckptd-test-") && !name.startsWith(`ckptd-test-${tag}-`)) || name.startsWith("ckptd-bench-");
}

export default function setup(): () => void {
  const tag = String(process.pid);
  // Inherited by the test workers, which start after this.
  process.env.TEST_RUN_TAG = tag;
  const before = entries();
  return () => {
    const left = [...entries()].filter((e) => !before.has(e) && !someoneElses(e, tag));
    if (left.length > 0)
      throw new Error(`the tests left ${left.length} entries behind: ${left.slice(0, 20).join(", ")}`);
  };
}
