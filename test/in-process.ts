/** Daemons started inside the test process (host backend, silent logs) and calls to them. */
import pino from "pino";
import { type Config, defaults } from "../daemon/config/index.ts";
import { type Daemon, startDaemon } from "../daemon/daemon.ts";
import { nodeRuntime } from "../daemon/runtime/node.ts";
import { AUTH, tempDir, testCredentials } from "./helpers.ts";

export const LIB_DIR = new URL("../cuda-lib/build/", import.meta.url).pathname;

/** A test daemon's configuration: host backend, any free port, its own state and upload directories. */
export function testConfig(overrides: Partial<Config> = {}): Config {
  return {
    ...defaults({}),
    port: 0,
    backend: "host",
    stateDir: tempDir(),
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
    ioThreads: 2,
    ...testCredentials(),
    ...overrides,
  };
}

/** Starts a daemon on `config` in this process, with node id "t" unless given. */
export function startInProcess(config: Config, nodeId = "t"): Promise<Daemon> {
  return startDaemon({ config, runtime: nodeRuntime, log: pino({ level: "silent" }), nodeId, libDir: LIB_DIR });
}

/** JSON calls to the daemon on `port` of loopback with the tests' admin token. */
export function apiOf(port: number) {
  return apiAt(`http://127.0.0.1:${port}`);
}

/** JSON calls to the daemon at `base` ("http://10.0.0.2:8470") with the tests' admin token. */
export function apiAt(base: string) {
  return async (method: string, path: string, body?: unknown) => {
    const res = await fetch(`${base}${path}`, {
      method,
      headers: body ? { ...AUTH, "content-type": "application/json" } : AUTH,
      body: body ? JSON.stringify(body) : undefined,
    });
    // biome-ignore lint/suspicious/noExplicitAny: checked field by field
    return { status: res.status, body: (await res.json()) as any };
  };
}
