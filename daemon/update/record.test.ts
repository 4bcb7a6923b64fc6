import { describe, expect, it } from "vitest";
import { receiverState, UpdateRecord } from "./record.ts";

describe("what a receiver holds once an update ended", () => {
  it.each([
    { done: true, acked: 5, aborted: false, state: "applied" },
    // Answered done, then the update failed elsewhere (an engine's hook): it still has every byte.
    { done: true, acked: 5, aborted: true, state: "applied" },
    // Acked every bucket but never answered end: it was told to abort, not to apply.
    { done: false, acked: 5, aborted: true, state: "aborted" },
    { done: false, acked: 2, aborted: true, state: "aborted" },
    { done: false, acked: 2, aborted: false, state: "partial" },
    { done: false, acked: 0, aborted: true, state: "untouched" },
    { done: false, acked: 0, aborted: false, state: "untouched" },
  ])("done $done, $acked acked, aborted $aborted: $state", ({ state, ...r }) => {
    expect(receiverState(r)).toBe(state);
  });
});

describe("an update's record as the API shows it", () => {
  it("starts running, with zero progress and timings, no receivers, no end and no error", () => {
    const r = new UpdateRecord("u-1", "m@1");
    expect(r.toJSON()).toEqual({
      id: "u-1",
      checkpoint: "m@1",
      state: "running",
      createdAt: r.createdAt,
      progress: { buckets: 0, bucketsDone: 0, bytes: 0, bytesDone: 0 },
      verify: false,
      skipped: { tensors: 0, bytes: 0 },
      deltas: { tensors: 0, bytes: 0, wholeBytes: 0 },
      timings: { seconds: 0, gbps: 0, planSeconds: 0, stallSeconds: 0, finishSeconds: 0, verifySeconds: 0 },
      receivers: [],
    });
    expect(new Date(r.createdAt).toISOString()).toBe(r.createdAt);
  });

  it("shows its end and its error once set, and the bucket timeline only when asked", () => {
    const r = new UpdateRecord("u-2", "m@1");
    r.state = "failed";
    r.finishedAt = "2026-01-01T00:00:01.000Z";
    r.error = { code: "update_failed", message: "boom" };
    r.buckets.push({ bucket: 0, owner: 0, bytes: 16, issued: 1 });
    expect(r.toJSON()).toMatchObject({ state: "failed", finishedAt: r.finishedAt, error: r.error });
    expect(r.toJSON()).not.toHaveProperty("buckets");
    expect(r.view(false)).not.toHaveProperty("buckets");
    expect(r.view(true).buckets).toEqual([{ bucket: 0, owner: 0, bytes: 16, issued: 1 }]);
  });
});
