import { describe, expect, it } from "vitest";
import { ConfigError, helpText, parseArgs, parseConfigFile, parseEnv, resolveConfig } from "./index.ts";
import { loadConfig } from "./load.ts";

const env = { HOME: "/home/u" };

describe("config layers", () => {
  it("uses defaults that work anywhere", () => {
    const config = resolveConfig({ env: {}, flags: {} }, env);
    expect(config).toMatchObject({
      host: "127.0.0.1",
      port: 8470,
      backend: "auto",
      stateDir: "/home/u/.local/state/ckptd",
    });
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
  ])("$name", ({ run, message }) => {
    expect(run).toThrow(ConfigError);
    expect(run).toThrow(message);
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
});
