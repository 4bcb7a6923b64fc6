/** The ckptd command: configuration, logging, the daemon, signals and systemd. */
import { fileURLToPath } from "node:url";
import pino from "pino";
import { ConfigError, helpText, loadConfig } from "./config/index.ts";
import { startDaemon } from "./daemon.ts";
import { loadNodeId } from "./node-id.ts";
import { currentRuntime } from "./runtime/index.ts";
import { VERSION } from "./version.ts";

/** The single binary's entry sets ckptdLibDir to where it extracted the libraries. */
function defaultLibDir(): string {
  return (
    (globalThis as { ckptdLibDir?: string }).ckptdLibDir ??
    fileURLToPath(new URL("../cuda-lib/build/", import.meta.url))
  );
}

export function fail(message: string, code: number): never {
  process.stderr.write(`ckptd: ${message}\n`);
  process.exit(code);
}

/** Runs the daemon until SIGTERM or SIGINT. Exit 2: bad configuration; 1: failed start. */
/** libuv threads for the data plane's blocking calls, unless UV_THREADPOOL_SIZE says otherwise. */
export const THREAD_POOL_SIZE = 16;

export async function main(argv: readonly string[], env: Record<string, string | undefined>): Promise<void> {
  // Every blocking data-plane call (pinning, hashing, waits for copies and pulls) takes one of
  // libuv's threads while it runs: Node's 4 let a pull's pinning hold up its completions. Read
  // by libuv when its pool starts, at the first such call.
  process.env.UV_THREADPOOL_SIZE ??= String(THREAD_POOL_SIZE);
  let loaded: ReturnType<typeof loadConfig>;
  let nodeId: string;
  try {
    loaded = loadConfig(argv, env);
    if (loaded.help) {
      process.stdout.write(`${helpText()}\n`);
      return;
    }
    if (loaded.version) {
      process.stdout.write(`ckptd ${VERSION}\n`);
      return;
    }
    try {
      nodeId = loadNodeId(loaded.config.stateDir);
    } catch (err) {
      throw new ConfigError(`stateDir ${loaded.config.stateDir}: ${(err as Error).message}`);
    }
  } catch (err) {
    if (err instanceof ConfigError) fail(`config: ${err.message}`, 2);
    throw err;
  }
  const { config } = loaded;
  const log = pino({ level: config.logLevel, base: { nodeId } });
  const runtime = await currentRuntime();
  let daemon: Awaited<ReturnType<typeof startDaemon>>;
  try {
    daemon = await startDaemon({ config, runtime, log, nodeId, libDir: config.libDir || defaultLibDir() });
  } catch (err) {
    // A tokens file, secret or upload directory refused is a configuration problem, said on one line.
    if (err instanceof ConfigError) fail(`config: ${err.message}`, 2);
    log.fatal({ err }, "start failed");
    fail(`start failed: ${(err as Error).message}`, 1);
  }
  daemon.context.lib.sdNotify("READY=1");

  let signalled = false;
  const shutdown = (signal: string) => {
    if (signalled) return;
    signalled = true;
    log.info({ signal }, "shutting down");
    daemon.context.lib.sdNotify("STOPPING=1");
    const timer = setTimeout(() => {
      log.error({ timeoutMs: config.shutdownTimeoutMs }, "shutdown timed out; exiting");
      process.exit(1);
    }, config.shutdownTimeoutMs);
    daemon.stop().then(
      () => {
        clearTimeout(timer);
        log.info("stopped");
        process.exit(0);
      },
      (err) => {
        log.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  runtime.onSignal("SIGTERM", () => shutdown("SIGTERM"));
  runtime.onSignal("SIGINT", () => shutdown("SIGINT"));
  runtime.onSignal("SIGHUP", () => {
    if (!signalled) daemon.reload();
  });
}
