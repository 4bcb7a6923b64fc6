/**
 * The engines' sockets: 0600 in a 0700 directory, or 0660 in a 0710 one with engineGroup;
 * every connection's credentials (SO_PEERCRED) checked and logged, so a socket left open to
 * everyone by mistake still lets no other user's process at the shared buckets.
 */
import { spawn } from "node:child_process";
import { chmodSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import type { Config } from "../daemon/config/index.ts";
import { type Daemon, startDaemon } from "../daemon/daemon.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { tempDir } from "./helpers.ts";
import { LIB_DIR, testConfig } from "./in-process.ts";

const running: Daemon[] = [];
afterEach(async () => {
  for (const d of running.splice(0)) await d.stop();
});

type Line = { msg: string; uid?: number; pid?: number; receiver?: string };

async function start(extra: Partial<Config> = {}) {
  // Others must reach the socket directory's parent for engineGroup to mean anything.
  const top = tempDir();
  chmodSync(top, 0o755);
  const socketDir = join(top, "sockets");
  const config = testConfig({ socketDir, ...extra });
  const logs: Line[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => logs.push(JSON.parse(line)) });
  const daemon = await startDaemon({ config, runtime: nodeRuntime, log, nodeId: "t", libDir: LIB_DIR });
  running.push(daemon);
  return { logs, socketDir, socket: join(socketDir, "gpu-0.sock") };
}

/**
 * Connects to `path` as another user, says hello and prints what came back, or the error:
 * "welcome" when the daemon took it, "refused" when it said so, "closed" when it hung up
 * saying nothing, else the errno name.
 */
function helloAs(uid: number, gid: number, path: string, groups: number[] = []): Promise<string> {
  const script = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(__import__("errno").errorcode[e.errno]); sys.exit()
try:
    s.sendall(json.dumps({"op": "hello", "protocol": 1, "pid": 1, "name": "intruder"}).encode() + b"\\n")
except (BrokenPipeError, ConnectionResetError):
    pass  # refused before the hello: what it said is still there to read
s.settimeout(10)
try:
    data = s.recv(65536)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print(json.loads(data.split(b"\\n")[0])["op"] if data else "closed")
`;
  // setpriv sets supplementary groups too, which spawn's uid and gid cannot.
  const ids = [`--reuid=${uid}`, `--regid=${gid}`, groups.length ? `--groups=${groups.join(",")}` : "--clear-groups"];
  const child = spawn("setpriv", [...ids, "/usr/bin/python3", "-c", script, path], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  child.stdout.on("data", (d) => {
    out += d;
  });
  return new Promise((resolve) => child.on("exit", () => resolve(out.trim())));
}

const modeOf = (path: string) => statSync(path).mode & 0o7777;

describe("engine sockets", () => {
  it("are 0600 in a 0700 directory by default, and another user cannot connect", async () => {
    const { socketDir, socket } = await start();
    expect(modeOf(socketDir)).toBe(0o700);
    expect(modeOf(socket)).toBe(0o600);
    expect(await helloAs(65534, 65534, socket)).toBe("EACCES");
  });

  it("are 0660 in a 0710 directory of engineGroup, whose members connect and are logged with their uid", async () => {
    const { logs, socketDir, socket } = await start({ engineGroup: "nogroup" });
    expect([modeOf(socketDir), statSync(socketDir).gid]).toEqual([0o710, 65534]);
    expect([modeOf(socket), statSync(socket).gid]).toEqual([0o660, 65534]);
    expect(await helloAs(65534, 65534, socket)).toBe("welcome");
    const connected = logs.find((l) => l.msg === "receiver connected");
    expect(connected).toMatchObject({ uid: 65534, receiver: expect.stringMatching(/^intruder \(pid \d+, GPU 0\)$/) });
    // The pid is the kernel's, not the one the hello claimed.
    expect(connected?.receiver).not.toContain("pid 1,");
    // A user of another name whose process runs with the group's id, or has it among its groups.
    expect(await helloAs(65533, 65534, socket)).toBe("welcome");
    expect(await helloAs(12345, 12345, socket, [65534])).toBe("welcome");
    // More groups than the first guess of the credential read (64).
    const many = Array.from({ length: 80 }, (_, i) => 20000 + i);
    expect(await helloAs(12345, 12345, socket, [...many, 65534])).toBe("welcome");
  });

  it("refuses, by its credentials, a process of another user that reaches a socket opened to everyone", async () => {
    const { logs, socketDir, socket } = await start();
    chmodSync(socketDir, 0o755);
    chmodSync(socket, 0o666); // an operator's mistake
    expect(await helloAs(12345, 12345, socket)).toBe("refused");
    expect(logs.filter((l) => l.msg.startsWith("receiver refused"))).toEqual([
      expect.objectContaining({
        msg: `receiver refused: uid 12345 is not the daemon's user (uid ${process.getuid?.()}); engines of other users need engineGroup`,
        uid: 12345,
      }),
    ]);
    expect(logs.some((l) => l.msg === "receiver connected")).toBe(false);
  });

  it("refuses a user outside engineGroup even when the socket is open to everyone", async () => {
    const { logs, socketDir, socket } = await start({ engineGroup: "nogroup" });
    chmodSync(socketDir, 0o711);
    chmodSync(socket, 0o666);
    expect(await helloAs(12345, 12345, socket)).toBe("refused");
    expect(logs.find((l) => l.msg.startsWith("receiver refused"))?.msg).toBe(
      `receiver refused: uid 12345 is neither the daemon's user (uid ${process.getuid?.()}) nor in engineGroup nogroup`,
    );
  });

  it("stops a second daemon on the same socket directory, leaving the first one's sockets working", async () => {
    const first = await start();
    await expect(start({ socketDir: first.socketDir })).rejects.toThrow(
      `socketDir ${first.socketDir}: ${first.socket} is in use by another daemon; give each its own socketDir`,
    );
    expect(await helloAs(0, 0, first.socket)).toBe("welcome");
  });

  it("stops the start (exit 2 in main) when the socket directory is another user's or writable by others", async () => {
    const top = tempDir();
    const theirs = join(top, "theirs");
    mkdirSync(theirs, { mode: 0o700 });
    const { chownSync } = await import("node:fs");
    chownSync(theirs, 65534, 65534);
    await expect(start({ socketDir: theirs })).rejects.toThrow(
      `socketDir ${theirs}: is owned by uid 65534, not by the daemon's user (uid ${process.getuid?.()}); remove it or choose another socketDir`,
    );
    const open = join(top, "open");
    mkdirSync(open);
    chmodSync(open, 0o777);
    await expect(start({ socketDir: open })).rejects.toThrow(`socketDir ${open}: is writable by every user (mode 777)`);
    await expect(start({ engineGroup: "no-such-group-here" })).rejects.toThrow(
      'engineGroup: no group "no-such-group-here" in /etc/group',
    );
  });
});
