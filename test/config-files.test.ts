import { readFileSync } from "node:fs";
import { expect, it } from "vitest";
import { parseConfigFile, resolveConfig } from "../daemon/config/index.ts";
import { ROOT } from "./helpers.ts";

it("the shipped config/ckptd.json is valid", () => {
  const path = `${ROOT}config/ckptd.json`;
  const file = parseConfigFile(readFileSync(path, "utf8"), path);
  expect(resolveConfig({ file, filePath: path, env: {}, flags: {} }, {}).port).toBe(8470);
});

it("the systemd unit waits for READY=1 and passes the config file", () => {
  const unit = readFileSync(`${ROOT}config/ckptd.service`, "utf8");
  expect(unit).toMatch(/^Type=notify$/m);
  expect(unit).toMatch(/^ExecStart=\/usr\/local\/bin\/ckptd --config \/etc\/ckptd\/ckptd.json$/m);
});
