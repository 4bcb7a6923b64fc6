export { ConfigError, helpText, loadConfig, parseArgs, parseConfigFile, parseEnv, resolveConfig } from "./load.ts";
export { type Config, ConfigSchema, defaults, type EngineConfig, KEYS } from "./schema.ts";
