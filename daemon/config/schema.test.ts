import { availableParallelism, totalmem } from "node:os";
import * as v from "valibot";
import { describe, expect, it } from "vitest";
import { ConfigSchema, defaults } from "./schema.ts";

describe("defaults", () => {
  it("are the documented values, and valid", () => {
    const config = defaults({ HOME: "/home/u" });
    expect(config).toMatchObject({
      host: "127.0.0.1",
      port: 8470,
      stateDir: "/home/u/.local/state/ckptd",
      backend: "auto",
      libDir: "", // the bundled or built libraries
      hostDevices: 1,
      ncclPath: "libnccl.so.2",
      logLevel: "info",
      shutdownTimeoutMs: 10000,
      pinnedBudgetBytes: Math.floor(totalmem() * 0.75), // 75% of physical memory
      maxVersions: 3,
      ioThreads: Math.min(16, availableParallelism()),
      uploadDir: "",
      registerRoots: ["/dev/shm"],
      uploadGroup: "",
      bucketBytes: 256 << 20,
      bucketSlots: 4,
      bucketMemoryBytes: 1 << 30,
      receiverTimeoutMs: 30000,
      maxBodyBytes: 16 << 20,
      socketDir: "",
      peers: [],
      tokensFile: "",
      clusterSecret: "",
      clusterSecretFile: "",
      engines: [],
    });
    expect(v.safeParse(ConfigSchema, config).success).toBe(true);
  });

  it("budget three quarters of the memory and at most 16 I/O threads", () => {
    const config = defaults({});
    expect(config.pinnedBudgetBytes).toBeLessThan(totalmem());
    expect(config.pinnedBudgetBytes).toBeGreaterThan(totalmem() / 2);
    expect(config.ioThreads).toBeLessThanOrEqual(16);
    expect(config.ioThreads).toBeLessThanOrEqual(availableParallelism());
    expect(config.ioThreads).toBeGreaterThanOrEqual(1);
  });

  it("put the state under XDG_STATE_HOME when it is set", () => {
    expect(defaults({ HOME: "/home/u", XDG_STATE_HOME: "/var/state" }).stateDir).toBe("/var/state/ckptd");
    expect(defaults({ HOME: "/home/u", XDG_STATE_HOME: "" }).stateDir).toBe("/home/u/.local/state/ckptd");
  });
});

describe("ConfigSchema", () => {
  const ok = defaults({ HOME: "/h" });
  it.each([
    ["a cluster secret under 16 characters", { clusterSecret: "short" }, "must be at least 16 characters"],
    ["a relative upload directory", { uploadDir: "up" }, "must be an absolute path (or empty)"],
    ["a relative register root", { registerRoots: ["/dev/shm", "x"] }, "must be absolute paths"],
    ["one bucket slot", { bucketSlots: 1 }, "Invalid value: Expected >=2 but received 1"],
  ])("refuses %s", (_case, change, message) => {
    const result = v.safeParse(ConfigSchema, { ...ok, ...change });
    expect(result.success).toBe(false);
    expect(result.issues?.[0]?.message).toBe(message);
  });

  it("never quotes a cluster secret of the wrong type", () => {
    const result = v.safeParse(ConfigSchema, { ...ok, clusterSecret: 1234567890123456 });
    expect(result.issues?.[0]?.message).toBe("must be a string");
  });
});
