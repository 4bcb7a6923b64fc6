import { existsSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { tempDir } from "../../test/helpers.ts";
import type { CheckpointVersion, Registry } from "./registry.ts";
import { StagingAreas } from "./staging.ts";

/** A registry whose registrations finish when the test says. */
function slowRegistry() {
  let finish = () => {};
  const finished = new Promise<void>((resolve) => {
    finish = resolve;
  });
  const registry = {
    checkBudget: () => undefined,
    stock: async () => undefined,
    register: async () => ({ id: "m@1", finished: () => finished }) as unknown as CheckpointVersion,
  } as unknown as Registry;
  return { registry, finish };
}

describe("StagingAreas", () => {
  it("deletes every area's file at close, one that is committing too", async () => {
    const { registry, finish } = slowRegistry();
    const areas = new StagingAreas(registry, tempDir());
    const idle = await areas.create({ name: "a", tensors: [{ name: "x", dtype: "F32", shape: [4] }] });
    const busy = await areas.create({ name: "b", tensors: [{ name: "y", dtype: "F32", shape: [4] }] });
    const committing = areas.commit(busy.id);
    expect(() => areas.get(busy.id)).toThrow(/busy with a commit/);
    await areas.close();
    expect(existsSync(idle.path)).toBe(false);
    expect(existsSync(busy.path)).toBe(false);
    expect(areas.list()).toEqual([]);
    finish();
    await committing;
  });
});
