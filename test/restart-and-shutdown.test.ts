/** Real daemon processes: a registry carried from Node to Deno, and SIGTERM during a stalled update. */
import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { writeModel, writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, daemonCommand, type Running, type RuntimeName, startProcess, tempDir, within } from "./helpers.ts";
import { ReferenceReceiver } from "./reference-receiver.ts";

async function api(d: Running, method: string, path: string, body?: unknown) {
  const res = await fetch(`${d.url}${path}`, {
    method,
    headers: body ? { ...AUTH, "content-type": "application/json" } : AUTH,
    body: body ? JSON.stringify(body) : undefined,
  });
  // biome-ignore lint/suspicious/noExplicitAny: checked field by field
  return { status: res.status, body: (await res.json()) as any };
}

async function stop(d: Running): Promise<void> {
  d.proc.kill("SIGTERM");
  expect(await d.exited).toBe(0);
}

describe("a registry saved under Node", () => {
  it("is restored under Deno, though Deno reports modification times in whole milliseconds", async () => {
    const stateDir = tempDir();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const [first] = writeModel(dir, 1);
    execFileSync("touch", ["-d", "@1700000000.123456789", first?.file as string]);
    const node = await startProcess(daemonCommand("node"), [], {}, { stateDir });
    expect((await api(node, "POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
    await stop(node);
    const deno = await startProcess(daemonCommand("deno"), [], {}, { stateDir });
    try {
      const status = (await api(deno, "GET", "/v1/status")).body;
      expect(status.runtime).toBe("deno");
      expect(status.checkpoints.restore).toEqual({ restored: ["m@1"], notRestored: [] });
    } finally {
      await stop(deno);
    }
  });
});

describe.each(["node", "deno"] as RuntimeName[])("SIGTERM during a stalled update under %s", (runtime) => {
  it("aborts it at the receivers, answers the waiting client naming the shutdown, then exits 0", async () => {
    const sockets = tempDir();
    const daemon = await startProcess(daemonCommand(runtime), [
      ...["--socket-dir", sockets, "--receiver-timeout-ms", "60000", "--bucket-bytes", String(1 << 20)],
    ]);
    const dir = tempDir("ckptd-test-", "/dev/shm");
    writeSafetensors(`${dir}/big.safetensors`, [{ name: "big", dtype: "F32", shape: [1024, 1024] }]);
    const receiver = new ReferenceReceiver(`${sockets}/gpu-0.sock`, "stalled", { stallAt: 1 });
    try {
      expect((await api(daemon, "POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
      await receiver.connect();
      const pending = api(daemon, "POST", "/v1/updates", { checkpoint: "m" });
      expect(await receiver.saw((m) => m.op === "bucket" && m.bucket === 1, 10_000)).toBe(true);
      const signalled = Date.now();
      daemon.proc.kill("SIGTERM");
      // Well before the shutdown limit (10 s) and the receiver timeout (60 s).
      const res = await within(5000, pending);
      expect(res.status).toBe(502);
      expect(res.body.error).toMatchObject({ code: "update_failed", message: "the daemon is shutting down" });
      expect(await receiver.saw((m) => m.op === "abort" && m.update === "u-1")).toBe(true);
      expect(await within(5000, daemon.exited)).toBe(0);
      expect(Date.now() - signalled).toBeLessThan(5000);
      expect(daemon.logs.some((line) => line.includes('"stopped"'))).toBe(true);
    } finally {
      await receiver.close();
      daemon.proc.kill("SIGKILL");
    }
  });
});
