import { availableParallelism, homedir, totalmem } from "node:os";
import { isAbsolute, join } from "node:path";
import * as v from "valibot";
import { PAUSE_MODES } from "../engines/plan.ts";

const port = v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(65535));

/** An engine on this host: how the daemon drives its updates and which GPUs its receivers use. */
export const EngineSchema = v.pipe(
  v.strictObject({
    name: v.pipe(v.string(), v.minLength(1)),
    /**
     * receiver: connects by itself; vllm, sglang: the RL sequence over their HTTP APIs
     * (engines/plan.ts); http: POST `body` to url.
     */
    kind: v.picklist(["receiver", "vllm", "sglang", "http"]),
    url: v.optional(v.pipe(v.string(), v.url())),
    body: v.optional(v.unknown()),
    gpus: v.pipe(v.array(v.pipe(v.number(), v.integer(), v.minValue(0))), v.minLength(1)),
    /** vllm: its weight transfer backend (vLLM 0.25+), or the ckptd worker extension. */
    api: v.optional(v.picklist(["weight-transfer", "worker-extension"])),
    /** How the engine is paused during the update (vllm: keep, wait, abort; sglang: retract, in_place, abort), or none. */
    pause: v.optional(v.string()),
    /** vllm: how the update lands (auto: layerwise reload for quantized and MLA models). */
    reload: v.optional(v.picklist(["auto", "direct", "layerwise"])),
    /** sglang: the loader, exactly as listed in its --custom-weight-loader (a dotted path: module.function). */
    loadFormat: v.optional(
      v.pipe(v.string(), v.regex(/^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$/, "must be a dotted path to a loader function")),
    ),
    /** How long the pause may take (vllm `wait` drains the running requests first). */
    pauseTimeoutMs: v.optional(v.pipe(v.number(), v.integer(), v.minValue(1))),
  }),
  v.check(
    (e) => e.kind === "receiver" || e.url !== undefined,
    (issue) => `engine "${issue.input.name}" of kind ${issue.input.kind} needs a "url"`,
  ),
  v.check(
    (e) =>
      e.pause === undefined ||
      (e.kind in PAUSE_MODES && PAUSE_MODES[e.kind as keyof typeof PAUSE_MODES].includes(e.pause)),
    (issue) => {
      const e = issue.input;
      const modes = PAUSE_MODES[e.kind as keyof typeof PAUSE_MODES];
      return modes
        ? `engine "${e.name}": pause ${JSON.stringify(e.pause)} is not one of ${modes.join(", ")}`
        : `engine "${e.name}" of kind ${e.kind} cannot be paused (only vllm and sglang engines)`;
    },
  ),
  v.check(
    (e) => !(e.kind === "vllm" && e.api !== "worker-extension" && e.pause === "none" && e.reload !== "direct"),
    (issue) =>
      `engine "${issue.input.name}": pause "none" needs reload "direct" (a layerwise reload moves the weights ` +
      "away until it finishes, and vLLM would serve requests meanwhile)",
  ),
  v.check(
    (e) => !unusable(e),
    (issue) => `engine "${issue.input.name}" of kind ${issue.input.kind} takes no "${unusable(issue.input)}"`,
  ),
);

/** A key set on an engine whose kind does not use it. */
function unusable(e: {
  kind: string;
  body?: unknown;
  api?: unknown;
  reload?: unknown;
  loadFormat?: unknown;
  pauseTimeoutMs?: unknown;
}) {
  if (e.body !== undefined && e.kind !== "http") return "body";
  if (e.api !== undefined && e.kind !== "vllm") return "api";
  if (e.reload !== undefined && e.kind !== "vllm") return "reload";
  if (e.loadFormat !== undefined && e.kind !== "sglang") return "loadFormat";
  if (e.pauseTimeoutMs !== undefined && e.kind !== "vllm" && e.kind !== "sglang") return "pauseTimeoutMs";
  return undefined;
}
export type EngineConfig = v.InferOutput<typeof EngineSchema>;
const text = v.pipe(v.string(), v.minLength(1));

/** The daemon's configuration. Every key can come from the file, CKPTD_<KEY> or a flag. */
export const ConfigSchema = v.strictObject({
  host: text,
  port,
  stateDir: v.pipe(text, v.check(isAbsolute, "must be an absolute path")),
  backend: v.picklist(["auto", "cuda", "host"]),
  libDir: v.string(),
  hostDevices: v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(64)),
  ncclPath: text,
  logLevel: v.picklist(["fatal", "error", "warn", "info", "debug", "trace"]),
  shutdownTimeoutMs: v.pipe(v.number(), v.integer(), v.minValue(0)),
  pinnedBudgetBytes: v.pipe(v.number(), v.integer(), v.minValue(0)),
  maxVersions: v.pipe(v.number(), v.integer(), v.minValue(1)),
  ioThreads: v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(64)),
  uploadDir: v.pipe(
    v.string(),
    v.check((s) => s === "" || isAbsolute(s), "must be an absolute path (or empty)"),
  ),
  registerRoots: v.array(v.pipe(v.string(), v.check(isAbsolute, "must be absolute paths"))),
  uploadGroup: v.string(),
  bucketBytes: v.pipe(v.number(), v.integer(), v.minValue(1 << 20)),
  bucketSlots: v.pipe(v.number(), v.integer(), v.minValue(2), v.maxValue(64)),
  bucketOrder: v.picklist(["auto", "size", "layers"]),
  verifyUpdates: v.boolean(),
  bucketMemoryBytes: v.pipe(v.number(), v.integer(), v.minValue(1 << 21)),
  receiverTimeoutMs: v.pipe(v.number(), v.integer(), v.minValue(1)),
  maxBodyBytes: v.pipe(v.number(), v.integer(), v.minValue(1)),
  socketDir: v.pipe(
    v.string(),
    v.check((s) => s === "" || isAbsolute(s), "must be an absolute path (or empty)"),
  ),
  engineGroup: v.string(),
  tlsCertFile: v.string(),
  tlsKeyFile: v.string(),
  peers: v.array(v.pipe(v.string(), v.url())),
  peerDns: v.array(v.pipe(v.string(), v.url())),
  advertiseUrl: v.union([v.literal(""), v.pipe(v.string(), v.url())]),
  heartbeatMs: v.pipe(v.number(), v.integer(), v.minValue(10)),
  peerDownMs: v.pipe(v.number(), v.integer(), v.minValue(20)),
  ucxPath: text,
  ucxTransports: v.pipe(v.string(), v.regex(/^[a-z0-9_,:^-]*$/, "must be a UCX transport list such as tcp or rc,sm")),
  ucxPort: port,
  ucxLanes: v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(16)),
  pullStallMs: v.pipe(v.number(), v.integer(), v.minValue(10)),
  pullChunkBytes: v.pipe(v.number(), v.integer(), v.minValue(4096), v.maxValue(1 << 30)),
  join: v.union([v.null(), v.strictObject({ checkpoint: v.pipe(v.string(), v.minLength(1)) })]),
  testFaults: v.array(v.picklist(["corrupt-serve"])),
  tokensFile: v.string(),
  // The value is never echoed in an error (valibot's default messages quote the input).
  clusterSecret: v.pipe(
    v.string("must be a string"),
    v.check((s) => s === "" || s.length >= 16, "must be at least 16 characters"),
  ),
  clusterSecretFile: v.string(),
  engines: v.array(EngineSchema),
});

export type Config = v.InferOutput<typeof ConfigSchema>;
export type ConfigKey = keyof Config;

interface KeyDoc {
  /** Empty for keys only the config file can set (structured values). */
  flag: string;
  env: string;
  kind: "string" | "integer" | "list" | "json";
  help: string;
}

/** One row per key: how to set it and what it means (also the --help text). */
export const KEYS: Record<ConfigKey, KeyDoc> = {
  host: { flag: "--host", env: "CKPTD_HOST", kind: "string", help: "address to listen on" },
  port: { flag: "--port", env: "CKPTD_PORT", kind: "integer", help: "TCP port of the HTTP API (0: any free port)" },
  stateDir: { flag: "--state-dir", env: "CKPTD_STATE_DIR", kind: "string", help: "directory for the daemon's state" },
  backend: { flag: "--backend", env: "CKPTD_BACKEND", kind: "string", help: "auto | cuda | host" },
  libDir: {
    flag: "--lib-dir",
    env: "CKPTD_LIB_DIR",
    kind: "string",
    help: "directory holding libckpt-*.so (empty: the bundled or built ones)",
  },
  hostDevices: {
    flag: "--host-devices",
    env: "CKPTD_HOST_DEVICES",
    kind: "integer",
    help: "devices the host backend simulates",
  },
  ncclPath: { flag: "--nccl-path", env: "CKPTD_NCCL_PATH", kind: "string", help: "NCCL library to load" },
  logLevel: {
    flag: "--log-level",
    env: "CKPTD_LOG_LEVEL",
    kind: "string",
    help: "fatal | error | warn | info | debug | trace",
  },
  shutdownTimeoutMs: {
    flag: "--shutdown-timeout-ms",
    env: "CKPTD_SHUTDOWN_TIMEOUT_MS",
    kind: "integer",
    help: "how long shutdown waits for work in flight",
  },
  pinnedBudgetBytes: {
    flag: "--pinned-budget-bytes",
    env: "CKPTD_PINNED_BUDGET_BYTES",
    kind: "integer",
    help: "pinned host memory all checkpoints may hold (0: no limit)",
  },
  maxVersions: {
    flag: "--max-versions",
    env: "CKPTD_MAX_VERSIONS",
    kind: "integer",
    help: "versions kept per checkpoint name (older unused ones are dropped)",
  },
  ioThreads: {
    flag: "--io-threads",
    env: "CKPTD_IO_THREADS",
    kind: "integer",
    help: "threads for reading and hashing checkpoints",
  },
  uploadDir: {
    flag: "--upload-dir",
    env: "CKPTD_UPLOAD_DIR",
    kind: "string",
    help: "the daemon's own directory for pushed checkpoints (empty: /dev/shm/ckptd-<node id>)",
  },
  registerRoots: {
    flag: "--register-roots",
    env: "CKPTD_REGISTER_ROOTS",
    kind: "list",
    help: "directories registrations may name files under, besides uploadDir (comma-separated; default /dev/shm)",
  },
  uploadGroup: {
    flag: "--upload-group",
    env: "CKPTD_UPLOAD_GROUP",
    kind: "string",
    help: "group whose members may write to uploadDir and adopt their files there (empty: none)",
  },
  bucketBytes: {
    flag: "--bucket-bytes",
    env: "CKPTD_BUCKET_BYTES",
    kind: "integer",
    help: "largest bucket an update moves at once (capped by free GPU memory)",
  },
  bucketSlots: {
    flag: "--bucket-slots",
    env: "CKPTD_BUCKET_SLOTS",
    kind: "integer",
    help: "bucket buffers per GPU (stages in flight)",
  },
  bucketOrder: {
    flag: "--bucket-order",
    env: "CKPTD_BUCKET_ORDER",
    kind: "string",
    help: "size: largest tensors first; layers: in layer order, for engines that reload layer by layer (vLLM: quantized and MLA models); auto: layers when a vllm engine may reload so",
  },
  verifyUpdates: {
    flag: "--verify-updates",
    env: "CKPTD_VERIFY_UPDATES",
    kind: "json",
    help: "true: updates hash each bucket on its GPU against the manifest before engines apply it, unless they say verify: false",
  },
  bucketMemoryBytes: {
    flag: "--bucket-memory-bytes",
    env: "CKPTD_BUCKET_MEMORY_BYTES",
    kind: "integer",
    help: "GPU memory all bucket slots of one GPU may take (buckets shrink to fit)",
  },
  receiverTimeoutMs: {
    flag: "--receiver-timeout-ms",
    env: "CKPTD_RECEIVER_TIMEOUT_MS",
    kind: "integer",
    help: "how long an engine may take to answer before the update aborts",
  },
  maxBodyBytes: {
    flag: "--max-body-bytes",
    env: "CKPTD_MAX_BODY_BYTES",
    kind: "integer",
    help: "largest JSON or CBOR request body (413 beyond)",
  },
  socketDir: {
    flag: "--socket-dir",
    env: "CKPTD_SOCKET_DIR",
    kind: "string",
    help: "directory of the engines' Unix sockets (empty: stateDir/sockets)",
  },
  engineGroup: {
    flag: "--engine-group",
    env: "CKPTD_ENGINE_GROUP",
    kind: "string",
    help: "group whose members' engines may connect to the sockets, then 0660 (empty: the daemon's user only, 0600)",
  },
  tlsCertFile: {
    flag: "--tls-cert-file",
    env: "CKPTD_TLS_CERT_FILE",
    kind: "string",
    help: "PEM certificate (chain) to serve the API over HTTPS, with tlsKeyFile (empty: plain HTTP)",
  },
  tlsKeyFile: {
    flag: "--tls-key-file",
    env: "CKPTD_TLS_KEY_FILE",
    kind: "string",
    help: "PEM private key of tlsCertFile, not readable by others",
  },
  peers: {
    flag: "--peers",
    env: "CKPTD_PEERS",
    kind: "list",
    help: "seeds: daemons to join at start (comma-separated URLs); the rest of the fleet is learnt from them",
  },
  peerDns: {
    flag: "--peer-dns",
    env: "CKPTD_PEER_DNS",
    kind: "list",
    help: "URLs whose host name resolves to many daemons (a headless service), resolved again every 10 heartbeats",
  },
  advertiseUrl: {
    flag: "--advertise-url",
    env: "CKPTD_ADVERTISE_URL",
    kind: "string",
    help: "the URL peers use to reach this daemon (empty: from host and port; the first non-loopback address for 0.0.0.0 or ::)",
  },
  heartbeatMs: {
    flag: "--heartbeat-ms",
    env: "CKPTD_HEARTBEAT_MS",
    kind: "integer",
    help: "how often this daemon tells its peers it is up, and whom it knows",
  },
  peerDownMs: {
    flag: "--peer-down-ms",
    env: "CKPTD_PEER_DOWN_MS",
    kind: "integer",
    help: "a peer not heard from for this long is down (left out of updates)",
  },
  ucxPath: { flag: "--ucx-path", env: "CKPTD_UCX_PATH", kind: "string", help: "UCX's libucp to load for pulls" },
  ucxTransports: {
    flag: "--ucx-transports",
    env: "CKPTD_UCX_TRANSPORTS",
    kind: "string",
    help: "UCX transports for pulls, as UCX_TLS takes them (tcp, rc,sm...; empty: UCX picks)",
  },
  ucxPort: {
    flag: "--ucx-port",
    env: "CKPTD_UCX_PORT",
    kind: "integer",
    help: "port of the first UCX lane peers pull from, on the API's host; lane i listens on ucxPort + i (0: any ports; peers learn them over the signed peer API)",
  },
  ucxLanes: {
    flag: "--ucx-lanes",
    env: "CKPTD_UCX_LANES",
    kind: "integer",
    help: "UCX workers (each a thread and a port) that serve and pull: a pull is spread over that many cores on each side",
  },
  pullStallMs: {
    flag: "--pull-stall-ms",
    env: "CKPTD_PULL_STALL_MS",
    kind: "integer",
    help: "a pull source that lands nothing for this long is dropped, its ranges go to the others",
  },
  pullChunkBytes: {
    flag: "--pull-chunk-bytes",
    env: "CKPTD_PULL_CHUNK_BYTES",
    kind: "integer",
    help: "bytes of one range of a pull (sources take ranges as they finish)",
  },
  join: {
    flag: "",
    env: "",
    kind: "json",
    help: 'at start, pull this checkpoint from the peers and give it to every engine that connects: {"checkpoint": "q8b"}',
  },
  testFaults: {
    flag: "",
    env: "",
    kind: "json",
    help: 'tests only: ["corrupt-serve"] serves every pulled range with a byte changed',
  },
  tokensFile: {
    flag: "--tokens-file",
    env: "CKPTD_TOKENS_FILE",
    kind: "string",
    help: "API tokens, one role:token per line, roles read | admin, mode 0600 (empty: stateDir/tokens, made at first start)",
  },
  clusterSecret: {
    flag: "--cluster-secret",
    env: "CKPTD_CLUSTER_SECRET",
    kind: "string",
    help: "secret that signs requests between daemons (prefer clusterSecretFile)",
  },
  clusterSecretFile: {
    flag: "--cluster-secret-file",
    env: "CKPTD_CLUSTER_SECRET_FILE",
    kind: "string",
    help: "file of the cluster secret, not readable by others (empty: stateDir/cluster-secret, made at first start)",
  },
  engines: {
    flag: "",
    env: "",
    kind: "json",
    help: "engines of this host: [{name, kind: receiver|vllm|sglang|http, url?, gpus, pause?, ...}]",
  },
};

/** Defaults that work on any machine, with or without a GPU. */
export function defaults(env: Record<string, string | undefined>): Config {
  const stateHome = env.XDG_STATE_HOME || join(env.HOME || homedir(), ".local", "state");
  return {
    host: "127.0.0.1",
    port: 8470,
    stateDir: join(stateHome, "ckptd"),
    backend: "auto",
    libDir: "",
    hostDevices: 1,
    ncclPath: "libnccl.so.2",
    logLevel: "info",
    shutdownTimeoutMs: 10000,
    pinnedBudgetBytes: Math.floor(totalmem() * 0.75),
    maxVersions: 3,
    ioThreads: Math.min(16, availableParallelism()),
    uploadDir: "",
    registerRoots: ["/dev/shm"],
    uploadGroup: "",
    bucketBytes: 256 << 20,
    bucketSlots: 4,
    bucketOrder: "auto",
    verifyUpdates: false,
    bucketMemoryBytes: 1 << 30,
    receiverTimeoutMs: 30000,
    maxBodyBytes: 16 << 20,
    socketDir: "",
    engineGroup: "",
    tlsCertFile: "",
    tlsKeyFile: "",
    peers: [],
    peerDns: [],
    advertiseUrl: "",
    heartbeatMs: 1000,
    peerDownMs: 5000,
    ucxPath: "libucp.so.0",
    ucxTransports: "",
    ucxPort: 0,
    ucxLanes: 4,
    pullStallMs: 10000,
    pullChunkBytes: 16 << 20,
    join: null,
    testFaults: [],
    tokensFile: "",
    clusterSecret: "",
    clusterSecretFile: "",
    engines: [],
  };
}
