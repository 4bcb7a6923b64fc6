/**
 * Configuration layers: defaults, then a JSON file, then CKPTD_* variables, then flags,
 * each overriding the one before. Pure functions over plain data, except readConfigFile.
 */
import { readFileSync } from "node:fs";
import * as v from "valibot";
import { type Config, type ConfigKey, ConfigSchema, defaults, KEYS } from "./schema.ts";

/** A configuration problem: the daemon prints the message on one line and exits 2. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

type Layer = Partial<Record<ConfigKey, unknown>>;
/** Where each value came from, for error messages. */
type Sources = Partial<Record<ConfigKey, string>>;

export interface Args {
  help: boolean;
  version: boolean;
  configFile?: string;
  values: Layer;
}

const ENV_CONFIG = "CKPTD_CONFIG";
const entries = Object.entries(KEYS) as [ConfigKey, (typeof KEYS)[ConfigKey]][];
const byFlag = new Map(entries.filter(([, doc]) => doc.flag).map(([key, doc]) => [doc.flag, key]));
const byEnv = new Map(entries.filter(([, doc]) => doc.env).map(([key, doc]) => [doc.env, key]));

function coerce(key: ConfigKey, raw: string): unknown {
  if (KEYS[key].kind === "integer" && /^-?\d+$/.test(raw.trim())) return Number(raw);
  if (KEYS[key].kind === "list")
    return raw
      .split(",")
      .map((x) => x.trim())
      .filter(Boolean);
  return raw;
}

/** Parses command-line flags (`--port 80` or `--port=80`). */
export function parseArgs(argv: readonly string[]): Args {
  const args: Args = { help: false, version: false, values: {} };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === "--help" || arg === "-h") args.help = true;
    else if (arg === "--version") args.version = true;
    else {
      const eq = arg.indexOf("=");
      const flag = eq > 0 ? arg.slice(0, eq) : arg;
      const key = byFlag.get(flag);
      if (flag !== "--config" && key === undefined) {
        throw new ConfigError(`unknown argument "${arg}" (see --help)`);
      }
      const value = eq > 0 ? arg.slice(eq + 1) : argv[++i];
      if (value === undefined) throw new ConfigError(`${flag} needs a value`);
      if (key === undefined) args.configFile = value;
      else args.values[key] = coerce(key, value);
    }
  }
  return args;
}

/** Reads CKPTD_* variables; an unknown CKPTD_ variable is an error (a likely typo). */
export function parseEnv(env: Record<string, string | undefined>): Layer {
  const layer: Layer = {};
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith("CKPTD_") || name === ENV_CONFIG || value === undefined) continue;
    const key = byEnv.get(name);
    if (key === undefined) throw new ConfigError(`unknown environment variable ${name} (see --help)`);
    layer[key] = coerce(key, value);
  }
  return layer;
}

/** Parses the text of a JSON config file; unknown keys are errors. */
export function parseConfigFile(text: string, path: string): Layer {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${path}: not valid JSON: ${(err as Error).message}`);
  }
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new ConfigError(`${path}: expected a JSON object of settings`);
  }
  for (const key of Object.keys(data)) {
    if (!Object.hasOwn(KEYS, key)) {
      throw new ConfigError(`${path}: unknown key "${key}" (known: ${Object.keys(KEYS).join(", ")})`);
    }
  }
  return data as Layer;
}

export function readConfigFile(path: string): Layer {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ConfigError(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  return parseConfigFile(text, path);
}

/** Merges the layers over the defaults and validates the result. */
export function resolveConfig(
  layers: { file?: Layer; filePath?: string; env: Layer; flags: Layer },
  env: Record<string, string | undefined>,
): Config {
  const merged: Record<string, unknown> = { ...defaults(env) };
  const sources: Sources = {};
  const apply = (layer: Layer | undefined, source: (key: ConfigKey) => string) => {
    for (const [key, value] of Object.entries(layer ?? {})) {
      merged[key] = value;
      sources[key as ConfigKey] = source(key as ConfigKey);
    }
  };
  apply(layers.file, () => layers.filePath ?? "config file");
  apply(layers.env, (key) => KEYS[key].env);
  apply(layers.flags, (key) => KEYS[key].flag);
  const result = v.safeParse(ConfigSchema, merged);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const key = (issue.path?.[0]?.key as ConfigKey | undefined) ?? undefined;
  const where = key ? `${key}${sources[key] ? ` (from ${sources[key]})` : ""}: ` : "";
  throw new ConfigError(`${where}${issue.message}`);
}

/** The whole pipeline for the daemon's start: flags, CKPTD_CONFIG or --config, env. */
export function loadConfig(
  argv: readonly string[],
  env: Record<string, string | undefined>,
): Args & { config: Config } {
  const args = parseArgs(argv);
  const filePath = args.configFile ?? env[ENV_CONFIG];
  const file = filePath ? readConfigFile(filePath) : undefined;
  const config = resolveConfig({ file, filePath, env: parseEnv(env), flags: args.values }, env);
  return { ...args, config };
}

/** The --help text, generated from the key table. */
export function helpText(): string {
  const rows = Object.entries(KEYS).map(([key, doc]) =>
    doc.flag
      ? `  ${`${doc.flag} ${doc.kind === "integer" ? "N" : "VALUE"}`.padEnd(28)}${doc.help} [${doc.env}, "${key}"]`
      : `  ${`"${key}"`.padEnd(28)}${doc.help} [config file only]`,
  );
  return [
    "Usage: ckptd [--config FILE] [options]",
    "",
    "Pushes registered checkpoints into running inference engines.",
    "Settings come from defaults, the JSON file (--config or CKPTD_CONFIG), CKPTD_* variables",
    "and flags, each overriding the one before.",
    "",
    "Options:",
    `  ${"--config FILE".padEnd(28)}JSON file of settings [CKPTD_CONFIG]`,
    ...rows,
    `  ${"--version".padEnd(28)}print the version and exit`,
    `  ${"--help".padEnd(28)}print this help and exit`,
  ].join("\n");
}
