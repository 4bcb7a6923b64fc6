import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["daemon/**/*.test.ts", "ffi/**/*.test.ts", "test/**/*.test.ts"],
    setupFiles: ["test/setup.ts"],
    globalSetup: ["test/global-setup.ts"],
    pool: "forks",
    testTimeout: 30_000,
    hookTimeout: 30_000,
  },
});
