/** What the tests across network namespaces share: whether they can run here, and `ip`. */
import { execFileSync } from "node:child_process";

function runs(cmd: string, ...args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/**
 * Whether namespaces can be made here (root, iproute2, and the other `tools` such as "tc");
 * under CI=true their absence is an error rather than a skip.
 */
export function netnsUsable(...tools: string[]): boolean {
  const can = process.getuid?.() === 0 && runs("ip", "-V") && tools.every((t) => runs(t, "-V"));
  if (!can && process.env.CI === "true") {
    throw new Error(
      `CI=true, but network namespaces need root, iproute2${tools.map((t) => ` and ${t}`).join("")} here`,
    );
  }
  return can;
}

/** Runs `ip` with these arguments (throws with its stderr on failure). */
export const ip = (...args: string[]) => execFileSync("ip", args, { stdio: "pipe" });

/** A short tag of this test run, to name namespaces and links apart from a neighbour's. */
export const runTag = (len: number) => `${process.env.TEST_RUN_TAG ?? "0"}`.slice(-len);

/** Deletes the namespaces and the bridge a test made, whichever of them exist. */
export function removeNetwork(namespaces: string[], bridge: string): void {
  for (const ns of namespaces) {
    try {
      ip("netns", "del", ns);
    } catch {}
  }
  try {
    ip("link", "del", bridge);
  } catch {}
}
