import { spawn } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ckptHash, writeModel, writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, daemonCommand, type Running, type RuntimeName, run, startProcess, tempDir } from "./helpers.ts";
import { ReferenceReceiver } from "./reference-receiver.ts";

/** A daemon's node id, from its status. */
async function nodeId(d: Running): Promise<string> {
  return ((await (await fetch(`${d.url}/v1/status`, { headers: AUTH })).json()) as { nodeId: string }).nodeId;
}

describe.each(["node", "deno"] as RuntimeName[])("the daemon under %s", (runtime) => {
  const command = daemonCommand(runtime);

  it("starts on defaults, answers healthz and status, and stops on SIGTERM", async () => {
    const daemon = await startProcess(command);
    const health = await fetch(`${daemon.url}/v1/healthz`);
    expect(await health.json()).toEqual({ ok: true });
    const status = (await (await fetch(`${daemon.url}/v1/status`, { headers: AUTH })).json()) as Record<
      string,
      unknown
    >;
    expect(status).toMatchObject({ runtime, backend: "host", version: "0.1.0" });
    expect(status.gpus).toEqual([expect.objectContaining({ index: 0, uuid: expect.stringMatching(/^HOST-/) })]);
    daemon.proc.kill("SIGTERM");
    expect(await daemon.exited).toBe(0);
    expect(daemon.logs.some((line) => line.includes('"stopped"'))).toBe(true);
  });

  it("registers a checkpoint from /dev/shm in place, with its hashes", async () => {
    const daemon = await startProcess(command);
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const tensors = writeModel(dir);
    const res = await fetch(`${daemon.url}/v1/checkpoints`, {
      method: "POST",
      headers: { ...AUTH, "content-type": "application/json" },
      body: JSON.stringify({ name: "m", dir }),
    });
    expect(res.status).toBe(201);
    const manifest = (await (await fetch(`${daemon.url}/v1/checkpoints/m`, { headers: AUTH })).json()) as {
      files: { inPlace: boolean }[];
      tensors: { name: string; hash: string }[];
    };
    expect(manifest.files.every((f) => f.inPlace)).toBe(true);
    for (const t of tensors) {
      expect(manifest.tensors.find((x) => x.name === t.name)?.hash).toBe(await ckptHash(t.bytes));
    }
    daemon.proc.kill("SIGTERM");
    expect(await daemon.exited).toBe(0);
    rmSync(dir, { recursive: true });
  });

  it("pushes an update into the receivers of its GPUs and of a peer daemon under Node", async () => {
    // The peer runs under Node; this runtime coordinates: its peer API calls, receiver
    // sockets and TCP collectives are all exercised.
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const tensors = writeModel(dir, 2, 3, 512);
    tensors.push(...writeSafetensors(`${dir}/big.safetensors`, [{ name: "big", dtype: "F32", shape: [700, 1024] }]));
    const sockets = [tempDir(), tempDir()];
    const small = ["--bucket-bytes", String(1 << 20), "--bucket-slots", "4"];
    const peer = await startProcess(daemonCommand("node"), ["--socket-dir", sockets[1] as string, ...small]);
    const daemon = await startProcess(command, [
      ...["--host-devices", "2", "--socket-dir", sockets[0] as string, "--peers", peer.url, ...small],
    ]);
    const receivers = [
      new ReferenceReceiver(`${sockets[0]}/gpu-0.sock`, "a0"),
      new ReferenceReceiver(`${sockets[0]}/gpu-1.sock`, "a1"),
      new ReferenceReceiver(`${sockets[1]}/gpu-0.sock`, "b0"),
    ];
    try {
      for (const r of receivers) await r.connect();
      for (const d of [daemon, peer]) {
        const res = await fetch(`${d.url}/v1/checkpoints`, {
          method: "POST",
          headers: { ...AUTH, "content-type": "application/json" },
          body: JSON.stringify({ name: "m", dir }),
        });
        expect(res.status).toBe(201);
      }
      const res = await fetch(`${daemon.url}/v1/updates`, {
        method: "POST",
        headers: { ...AUTH, "content-type": "application/json" },
        body: JSON.stringify({ checkpoint: "m" }),
      });
      const body = (await res.json()) as { state: string; error?: unknown };
      expect(body.error).toBeUndefined();
      expect(body.state).toBe("succeeded");
      const coordinator = await nodeId(daemon);
      for (const [i, r] of receivers.entries()) {
        const got = r.hashes.get(i < 2 ? "u-1" : `u-1@${coordinator}`);
        expect(got?.size).toBe(tensors.length);
        for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
      }
    } finally {
      for (const r of receivers) await r.close();
      for (const d of [daemon, peer]) {
        d.proc.kill("SIGTERM");
        expect(await d.exited).toBe(0);
      }
      rmSync(dir, { recursive: true });
    }
  });

  it.each([
    { name: "a wrong type", args: ["--port", "eighty"], message: /port \(from --port\)/ },
    { name: "an unknown flag", args: ["--prot", "1"], message: /unknown argument "--prot"/ },
    { name: "an unreadable file", args: ["--config", "/nonexistent.json"], message: /cannot read config file/ },
  ])("exits 2 with one line on $name, starting nothing", async ({ args, message }) => {
    const result = await run(command, args);
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    expect(result.stderr.trim().split("\n")).toHaveLength(1);
    expect(result.stderr).toMatch(message);
  });
});

describe("configuration sources reach the daemon", () => {
  it("takes the file, then CKPTD_*, then flags", async () => {
    const dir = tempDir();
    const file = join(dir, "ckptd.json");
    writeFileSync(file, JSON.stringify({ hostDevices: 2, logLevel: "warn" }));
    const daemon = await startProcess(daemonCommand("node"), ["--config", file, "--log-level", "info"], {
      CKPTD_HOST_DEVICES: "3",
    });
    const status = (await (await fetch(`${daemon.url}/v1/status`, { headers: AUTH })).json()) as { gpus: unknown[] };
    expect(status.gpus).toHaveLength(3);
    daemon.proc.kill("SIGTERM");
    expect(await daemon.exited).toBe(0);
  });

  it("rejects an unknown key in the file, naming it", async () => {
    const file = join(tempDir(), "ckptd.json");
    writeFileSync(file, JSON.stringify({ prot: 1 }));
    const result = await run(daemonCommand("node"), ["--config", file]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`${file}: unknown key "prot"`);
  });
});

/** Plays systemd: a datagram socket at NOTIFY_SOCKET that records what it receives. */
function fakeSystemd(path: string) {
  const script = [
    "import socket, sys",
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)",
    "s.bind(sys.argv[1]); print('bound', flush=True)",
    "while True:",
    "    msg = s.recv(4096).decode(); print(msg, flush=True)",
    "    if 'STOPPING=1' in msg: break",
  ].join("\n");
  const proc = spawn("python3", ["-c", script, path], { stdio: ["ignore", "pipe", "inherit"] });
  const messages: string[] = [];
  const bound = new Promise<void>((resolve) =>
    proc.stdout.on("data", (chunk: Buffer) => {
      for (const line of chunk.toString().split("\n")) {
        if (line === "bound") resolve();
        else if (line) messages.push(line);
      }
    }),
  );
  const done = new Promise<void>((resolve) => proc.on("exit", () => resolve()));
  return { bound, done, messages };
}

describe("systemd notification", () => {
  it("sends READY=1 once listening and STOPPING=1 on SIGTERM", async () => {
    const socketPath = join(tempDir(), "notify.sock");
    const systemd = fakeSystemd(socketPath);
    await systemd.bound;
    const daemon = await startProcess(daemonCommand("node"), [], { NOTIFY_SOCKET: socketPath });
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(systemd.messages).toEqual(["READY=1"]);
    daemon.proc.kill("SIGTERM");
    await systemd.done;
    expect(await daemon.exited).toBe(0);
    expect(systemd.messages).toEqual(["READY=1", "STOPPING=1"]);
  });
});
