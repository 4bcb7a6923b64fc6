import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir, thrown } from "../../test/helpers.ts";
import { ConfigError, helpText, parseArgs, parseConfigFile, parseEnv, resolveConfig } from "./index.ts";
import { loadConfig } from "./load.ts";
import { KEYS } from "./schema.ts";

const env = { HOME: "/home/u" };

describe("config layers", () => {
  it("uses defaults that work anywhere", () => {
    const config = resolveConfig({ env: {}, flags: {} }, env);
    expect(config).toMatchObject({
      host: "127.0.0.1",
      port: 8470,
      backend: "auto",
      stateDir: "/home/u/.local/state/ckptd",
      maxBodyBytes: 16 << 20,
      uploadDir: "",
      registerRoots: ["/dev/shm"],
      uploadGroup: "",
    });
  });

  it("takes maxBodyBytes from a flag or CKPTD_MAX_BODY_BYTES, and refuses 0", () => {
    expect(parseArgs(["--max-body-bytes", "4096"]).values).toEqual({ maxBodyBytes: 4096 });
    expect(parseEnv({ CKPTD_MAX_BODY_BYTES: "8192" })).toEqual({ maxBodyBytes: 8192 });
    expect(() => resolveConfig({ env: {}, flags: { maxBodyBytes: 0 } }, env)).toThrow(
      /^maxBodyBytes \(from --max-body-bytes\): /,
    );
  });

  it.each([
    { name: "file over defaults", file: { port: 1 }, envLayer: {}, flags: {}, port: 1 },
    { name: "env over file", file: { port: 1 }, envLayer: { port: 2 }, flags: {}, port: 2 },
    { name: "flags over env", file: { port: 1 }, envLayer: { port: 2 }, flags: { port: 3 }, port: 3 },
  ])("$name", ({ file, envLayer, flags, port }) => {
    expect(resolveConfig({ file, env: envLayer, flags }, env).port).toBe(port);
  });

  it("reads flags in both spellings and coerces integers", () => {
    const args = parseArgs(["--port", "9000", "--host=0.0.0.0", "--config", "/etc/ckptd.json", "--backend", "host"]);
    expect(args.values).toEqual({ port: 9000, host: "0.0.0.0", backend: "host" });
    expect(args.configFile).toBe("/etc/ckptd.json");
  });

  it("reads CKPTD_* variables and ignores others", () => {
    expect(parseEnv({ CKPTD_PORT: "1234", CKPTD_STATE_DIR: "/s", PATH: "/bin", CKPTD_CONFIG: "/c" })).toEqual({
      port: 1234,
      stateDir: "/s",
    });
  });

  it("loads the file named by CKPTD_CONFIG", () => {
    expect(() => loadConfig([], { CKPTD_CONFIG: "/nonexistent/ckptd.json" })).toThrow(
      /cannot read config file \/nonexistent\/ckptd.json/,
    );
  });
});

describe("config errors name the key and the problem", () => {
  it.each([
    { name: "unknown flag", run: () => parseArgs(["--prot", "1"]), message: 'unknown argument "--prot"' },
    { name: "flag without value", run: () => parseArgs(["--port"]), message: "--port needs a value" },
    { name: "unknown variable", run: () => parseEnv({ CKPTD_PROT: "1" }), message: "CKPTD_PROT" },
    {
      name: "unknown file key",
      run: () => parseConfigFile('{"prot": 1}', "/c.json"),
      message: '/c.json: unknown key "prot"',
    },
    { name: "file not JSON", run: () => parseConfigFile("{port", "/c.json"), message: "/c.json: not valid JSON" },
    { name: "file not object", run: () => parseConfigFile("[1]", "/c.json"), message: "expected a JSON object" },
    {
      name: "wrong type from file",
      run: () => resolveConfig({ file: { port: "x" }, filePath: "/c.json", env: {}, flags: {} }, env),
      message: 'port (from /c.json): Invalid type: Expected number but received "x"',
    },
    {
      name: "wrong type from env",
      run: () => resolveConfig({ env: parseEnv({ CKPTD_PORT: "eighty" }), flags: {} }, env),
      message: "port (from CKPTD_PORT)",
    },
    {
      name: "out of range flag",
      run: () => resolveConfig({ env: {}, flags: parseArgs(["--port", "70000"]).values }, env),
      message: "port (from --port)",
    },
    {
      name: "bad enum",
      run: () => resolveConfig({ env: {}, flags: { backend: "gpu" } }, env),
      message: "backend (from --backend)",
    },
    {
      name: "a relative register root",
      run: () => resolveConfig({ env: parseEnv({ CKPTD_REGISTER_ROOTS: "/dev/shm,models" }), flags: {} }, env),
      message: "registerRoots (from CKPTD_REGISTER_ROOTS): must be absolute paths",
    },
    {
      name: "a relative upload directory",
      run: () => resolveConfig({ env: {}, flags: parseArgs(["--upload-dir", "up"]).values }, env),
      message: "uploadDir (from --upload-dir): must be an absolute path (or empty)",
    },
    ...["vllm", "http"].map((kind) => ({
      name: `engine of kind ${kind} without a url`,
      run: () =>
        resolveConfig(
          { file: { engines: [{ name: "e1", kind, gpus: [0] }] }, filePath: "/c.json", env: {}, flags: {} },
          env,
        ),
      message: `engines (from /c.json): engine "e1" of kind ${kind} needs a "url"`,
    })),
  ])("$name", ({ run, message }) => {
    expect(run).toThrow(ConfigError);
    expect(run).toThrow(message);
  });
});

describe("flags", () => {
  it.each([
    { argv: [], help: false, version: false },
    { argv: ["-h"], help: true, version: false },
    { argv: ["--help"], help: true, version: false },
    { argv: ["--version"], help: false, version: true },
  ])("reads $argv as help $help, version $version", ({ argv, help, version }) => {
    expect(parseArgs(argv)).toEqual({ help, version, values: {} });
  });

  it("coerces by the key's kind: integers (spaces allowed), comma lists, strings as they are", () => {
    expect(parseArgs(["--port", " 80 ", "--host", "123", "--peers", "http://a:1, http://b:2,"]).values).toEqual({
      port: 80,
      host: "123",
      peers: ["http://a:1", "http://b:2"],
    });
    expect(parseArgs(["--port=80x"]).values).toEqual({ port: "80x" });
    expect(parseArgs(["--port=-1"]).values).toEqual({ port: -1 });
  });

  it.each(["__proto__", "toString", "constructor"])("rejects the file key %j (not a setting)", (key) => {
    expect(() => parseConfigFile(`{"${key}": {"port": 1}}`, "/c.json")).toThrow(`/c.json: unknown key "${key}"`);
  });

  it.each(["null", '"x"', "1"])("rejects the file %s (not an object of settings)", (text) => {
    expect(() => parseConfigFile(text, "/c.json")).toThrow("/c.json: expected a JSON object of settings");
  });
});

describe("engines", () => {
  it("takes a receiver without a url, and vllm and http engines with one", () => {
    const engines = [
      { name: "r", kind: "receiver", gpus: [0] },
      { name: "v", kind: "vllm", url: "http://127.0.0.1:8000", gpus: [1] },
      { name: "h", kind: "http", url: "http://127.0.0.1:9000/update", body: { x: 1 }, gpus: [0, 1] },
    ];
    expect(resolveConfig({ file: { engines }, env: {}, flags: {} }, env).engines).toEqual(engines);
  });

  it("takes the RL settings of vllm and sglang engines", () => {
    const engines = [
      {
        name: "v",
        kind: "vllm",
        url: "http://h:8000",
        gpus: [0],
        api: "worker-extension",
        pause: "wait",
        reload: "layerwise",
      },
      { name: "s", kind: "sglang", url: "http://h:30000", gpus: [1], pause: "in_place", loadFormat: "my.loader" },
      { name: "n", kind: "sglang", url: "http://h:30001", gpus: [1], pause: "none" },
    ];
    expect(resolveConfig({ file: { engines }, env: {}, flags: {} }, env).engines).toEqual(engines);
  });

  it.each([
    [{ kind: "vllm", pause: "retract" }, 'engine "e": pause "retract" is not one of keep, wait, abort, none'],
    [{ kind: "sglang", pause: "keep" }, 'engine "e": pause "keep" is not one of retract, in_place, abort, none'],
    [{ kind: "http", pause: "keep" }, 'engine "e" of kind http cannot be paused (only vllm and sglang engines)'],
    [{ kind: "sglang", api: "worker-extension" }, 'engine "e" of kind sglang takes no "api"'],
    [{ kind: "sglang", reload: "direct" }, 'engine "e" of kind sglang takes no "reload"'],
    [{ kind: "vllm", loadFormat: "x.y" }, 'engine "e" of kind vllm takes no "loadFormat"'],
    [{ kind: "vllm", body: {} }, 'engine "e" of kind vllm takes no "body"'],
    [{ kind: "http", pauseTimeoutMs: 1000 }, 'engine "e" of kind http takes no "pauseTimeoutMs"'],
    [{ kind: "vllm", pause: "none" }, 'engine "e": pause "none" needs reload "direct"'],
    [{ kind: "sglang", loadFormat: "direct" }, "must be a dotted path to a loader function"],
  ])("refuses %o", (extra, message) => {
    const engines = [{ name: "e", url: "http://h:1", gpus: [0], ...extra }];
    expect(() => resolveConfig({ file: { engines }, env: {}, flags: {} }, env)).toThrow(message);
  });
});

describe("help", () => {
  it("lists every flag with its variable", () => {
    const text = helpText();
    for (const flag of ["--config", "--host", "--port", "--state-dir", "--backend", "--help"]) {
      expect(text).toContain(flag);
    }
    expect(text).toContain("CKPTD_PORT");
  });

  it("has one line per option, saying how to set it and what it does", () => {
    const lines = helpText().split("\n");
    expect(lines[0]).toBe("Usage: ckptd [--config FILE] [options]");
    expect(lines.slice(1, 7).join(" ")).toMatch(
      /^ Pushes registered checkpoints .* each overriding the one before\. {2}Options:$/,
    );
    expect(lines).toContain(`  ${"--config FILE".padEnd(28)}JSON file of settings [CKPTD_CONFIG]`);
    expect(lines).toContain(
      `  ${"--port N".padEnd(28)}TCP port of the HTTP API (0: any free port) [CKPTD_PORT, "port"]`,
    );
    expect(lines).toContain(`  ${"--host VALUE".padEnd(28)}address to listen on [CKPTD_HOST, "host"]`);
    expect(lines).toContain(
      `  ${"--max-body-bytes N".padEnd(28)}largest JSON or CBOR request body (413 beyond) [CKPTD_MAX_BODY_BYTES, "maxBodyBytes"]`,
    );
    // Keys only the file can set name the key, not an empty flag and variable.
    expect(lines).toContain(
      `  ${'"engines"'.padEnd(28)}engines of this host: [{name, kind: receiver|vllm|sglang|http, url?, gpus, pause?, ...}] [config file only]`,
    );
    for (const line of lines) expect(line).not.toMatch(/^ {3}|\[, /);
    expect(lines.slice(-2)).toEqual([
      `  ${"--version".padEnd(28)}print the version and exit`,
      `  ${"--help".padEnd(28)}print this help and exit`,
    ]);
  });
});

describe("loadConfig", () => {
  it("merges the file named by --config, CKPTD_* variables and flags, and returns the flags read", () => {
    const path = join(tempDir(), "ckptd.json");
    writeFileSync(path, JSON.stringify({ port: 1, host: "10.0.0.1", maxVersions: 7 }));
    const loaded = loadConfig(["--config", path, "--port", "3"], { HOME: "/h", CKPTD_HOST: "0.0.0.0" });
    expect(loaded).toMatchObject({ help: false, version: false, configFile: path, values: { port: 3 } });
    expect(loaded.config).toMatchObject({
      port: 3,
      host: "0.0.0.0",
      maxVersions: 7,
      stateDir: "/h/.local/state/ckptd",
    });
  });

  it("reads the file CKPTD_CONFIG names, and says which file a bad value came from", () => {
    const path = join(tempDir(), "ckptd.json");
    writeFileSync(path, JSON.stringify({ maxVersions: 5 }));
    expect(loadConfig(["--version"], { HOME: "/h", CKPTD_CONFIG: path })).toMatchObject({
      version: true,
      config: { maxVersions: 5 },
    });
    writeFileSync(path, JSON.stringify({ maxVersions: 0 }));
    const err = thrown(() => loadConfig([], { HOME: "/h", CKPTD_CONFIG: path }));
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.name).toBe("ConfigError");
    expect(err.message).toMatch(new RegExp(`^maxVersions \\(from ${path}\\): `));
  });
});

describe("more config errors", () => {
  it("names the config file as such when its path is not known", () => {
    expect(() => resolveConfig({ file: { port: "x" }, env: {}, flags: {} }, env)).toThrow(
      /^port \(from config file\): Invalid type/,
    );
  });

  it("lists the known keys after an unknown one", () => {
    expect(thrown(() => parseConfigFile('{"prot": 1}', "/c.json")).message).toBe(
      `/c.json: unknown key "prot" (known: ${Object.keys(KEYS).join(", ")})`,
    );
    expect(Object.keys(KEYS).slice(0, 2)).toEqual(["host", "port"]);
  });

  it("takes an integer key's value as an integer only when it is all digits", () => {
    expect(parseArgs(["--port=x80", "--io-threads", "4x", "--max-versions", "-2"]).values).toEqual({
      port: "x80",
      ioThreads: "4x",
      maxVersions: -2,
    });
    expect(() => resolveConfig({ env: {}, flags: parseArgs(["--port=x80"]).values }, env)).toThrow(
      'port (from --port): Invalid type: Expected number but received "x80"',
    );
  });

  it("skips a CKPTD_ variable that is present but unset", () => {
    expect(parseEnv({ CKPTD_PORT: undefined, CKPTD_HOST: "h" })).toEqual({ host: "h" });
  });

  it("says an argument starting with = is unknown", () => {
    expect(thrown(() => parseArgs(["=80"])).message).toBe('unknown argument "=80" (see --help)');
  });
});

describe("help text", () => {
  it("says where settings come from and in which order", () => {
    expect(helpText().split("\n").slice(3, 5)).toEqual([
      "Settings come from defaults, the JSON file (--config or CKPTD_CONFIG), CKPTD_* variables",
      "and flags, each overriding the one before.",
    ]);
  });
});
