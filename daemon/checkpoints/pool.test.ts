import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Context, openBackend } from "../../ffi/index.ts";
import { LIB_DIR } from "../../test/in-process.ts";
import { PinnedPool, SLACK } from "./pool.ts";

let ctx: Context;
beforeAll(async () => {
  ctx = (await openBackend("host", LIB_DIR)).context;
});
afterAll(async () => {
  await ctx.destroy(); // fails (CKPT_EBUSY) if a block was left pinned
});

describe("PinnedPool", () => {
  it("reuses the smallest block that fits closely, and pins fresh for one that would waste too much", async () => {
    const pool = new PinnedPool(ctx);
    const small = await pool.take(1 << 20);
    const big = await pool.take(256 << 20);
    pool.give(big);
    pool.give(small);
    expect(pool.status()).toEqual({ bytes: (1 << 20) + (256 << 20), blocks: 2, reused: 0, fresh: 2 });
    expect(await pool.take(1000)).toBe(small); // the smallest that fits
    const fresh = await pool.take(16 << 20); // the big block would waste more than SLACK
    expect(fresh).not.toBe(big);
    expect(256 << 20).toBeGreaterThan((16 << 20) + SLACK(16 << 20));
    expect(await pool.take(250 << 20)).toBe(big);
    expect(pool.status()).toMatchObject({ blocks: 0, reused: 2, fresh: 3 });
    for (const b of [small, fresh, big]) pool.give(b);
    await pool.trim(2 << 20); // largest first
    expect(pool.status()).toMatchObject({ blocks: 1, bytes: 1 << 20 });
    await pool.close();
    expect(pool.bytes()).toBe(0);
  });
});
