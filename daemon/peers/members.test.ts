/** The membership state machine: up on a heartbeat, down after silence, left when told; rumors are only candidates. */
import { describe, expect, it } from "vitest";
import { Members, type SelfInfo } from "./members.ts";

const info = (nodeId: string, url = `http://h-${nodeId}:8470`): SelfInfo => ({
  nodeId,
  url,
  backend: "host",
  gpus: 1,
  versions: [],
  beat: 0,
});

describe("Members", () => {
  it("a daemon heard from is up, down after downMs of silence, up again when heard", () => {
    const m = new Members("me", 100);
    m.heard(info("a"), 1000);
    expect(m.up().map((x) => x.nodeId)).toEqual(["a"]);
    expect(m.sweep(1100)).toEqual([]);
    expect(m.sweep(1101).map((x) => [x.nodeId, x.state])).toEqual([["a", "down"]]);
    expect(m.sweep(1200)).toEqual([]); // said once
    m.heard(info("a"), 1300);
    expect(m.get("a")?.state).toBe("up");
    expect(m.get("a")?.lastSeen).toBe(1300);
  });

  it("left stays left until the daemon speaks again, and gets no heartbeats", () => {
    const m = new Members("me", 100);
    m.heard(info("a"), 0);
    m.left("a");
    m.left("nobody");
    expect(m.get("a")?.state).toBe("left");
    expect(m.sweep(10_000)).toEqual([]);
    expect(m.targets()).toEqual([]);
    m.heard(info("a"), 20_000);
    expect(m.get("a")?.state).toBe("up");
  });

  it("rumors of others make candidates, never members; left ones and known ones are passed over", () => {
    const m = new Members("me", 100);
    m.heard(info("a"), 0);
    m.rumors(
      [
        { nodeId: "b", url: "http://b:1/", state: "up", beat: 9 },
        { nodeId: "a", url: "http://elsewhere:1", state: "up", beat: 0 },
        { nodeId: "c", url: "http://c:1", state: "left", beat: 9 },
        { nodeId: "me", url: "http://me:1", state: "up", beat: 9 },
      ],
      0,
    );
    expect(m.list().map((x) => x.nodeId)).toEqual(["a"]);
    expect(m.targets()).toEqual([{ url: "http://h-a:8470", nodeId: "a" }, { url: "http://b:1" }]);
    m.answered("http://b:1/");
    expect(m.targets()).toEqual([{ url: "http://h-a:8470", nodeId: "a" }]);
  });

  it("a member whose beat others saw rise stays up without a word of its own; a stale beat is no news", () => {
    const m = new Members("me", 100);
    m.heard({ ...info("a"), beat: 5 }, 0);
    m.rumors([{ nodeId: "a", url: "http://h-a:8470", state: "up", beat: 5 }], 90);
    expect(m.sweep(101).map((x) => x.nodeId)).toEqual(["a"]); // no newer beat: down
    m.rumors([{ nodeId: "a", url: "http://h-a:8470", state: "up", beat: 6 }], 150);
    expect([m.get("a")?.state, m.get("a")?.lastSeen, m.get("a")?.info.beat]).toEqual(["up", 150, 6]);
    expect(m.sweep(240)).toEqual([]);
    m.left("a");
    m.rumors([{ nodeId: "a", url: "http://h-a:8470", state: "up", beat: 7 }], 300);
    expect(m.get("a")?.state).toBe("left"); // only its own word brings it back
  });

  it("sends each round to a few members, those heard of least recently first, and to every candidate", () => {
    const m = new Members("me", 10_000);
    for (const [id, at] of [
      ["a", 30],
      ["b", 10],
      ["c", 20],
      ["d", 40],
    ] as const)
      m.heard(info(id), at);
    m.propose("http://new:1");
    expect(m.targets(2, () => 0)).toEqual([
      { url: "http://h-b:8470", nodeId: "b" },
      { url: "http://h-c:8470", nodeId: "c" },
      { url: "http://new:1" },
    ]);
    expect(m.targets().length).toBe(5);
  });

  it("a candidate that answers becomes a member; a URL that is a member's is no candidate", () => {
    const m = new Members("me", 100);
    m.propose("http://seed:8470/");
    m.heard(info("s", "http://seed:8470"), 0);
    expect(m.targets()).toEqual([{ url: "http://seed:8470", nodeId: "s" }]);
    m.propose("http://seed:8470");
    expect(m.targets()).toHaveLength(1);
  });

  it("another node id at a member's URL replaces it (the daemon there was made anew)", () => {
    const m = new Members("me", 100);
    m.heard(info("old", "http://h:1"), 0);
    m.heard(info("new", "http://h:1"), 5);
    expect(m.list().map((x) => x.nodeId)).toEqual(["new"]);
  });

  it("ignores itself", () => {
    const m = new Members("me", 100);
    expect(m.heard(info("me"), 0)).toBeUndefined();
    expect(m.list()).toEqual([]);
  });

  it("tells others whom it knows, with their state", () => {
    const m = new Members("me", 100);
    m.heard(info("b"), 0);
    m.heard(info("a"), 0);
    m.left("b");
    expect(m.rumorsOut()).toEqual([
      { nodeId: "a", url: "http://h-a:8470", state: "up", beat: 0 },
      { nodeId: "b", url: "http://h-b:8470", state: "left", beat: 0 },
    ]);
  });
});
