export { ConfigError, helpText, loadConfig, parseArgs, parseConfigFile, parseEnv, resolveConfig } from "./load.ts";
export { type Config, ConfigSchema, defaults, KEYS } from "./schema.ts";
