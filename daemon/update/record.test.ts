import { describe, expect, it } from "vitest";
import { receiverState } from "./record.ts";

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
