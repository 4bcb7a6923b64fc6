/** The membership state machine: up while a daemon's (startedAt, beat) rises, down after silence, left when told. */
import { describe, expect, it } from "vitest";
import { CANDIDATE_FAILURES, Members, type SelfInfo } from "./members.ts";

const info = (nodeId: string, beat = 1, url = `http://h-${nodeId}:8470`, startedAt = 100): SelfInfo => ({
  nodeId,
  url,
  backend: "host",
  gpus: 1,
  versions: [],
  startedAt,
  beat,
});
const rumor = (nodeId: string, beat: number, state: "up" | "down" | "left" = "up", startedAt = 100) => ({
  nodeId,
  url: `http://h-${nodeId}:8470`,
  state,
  startedAt,
  beat,
});

describe("Members", () => {
  it("a daemon heard from is up, down after downMs of silence, up again on a newer beat", () => {
    const m = new Members("me", 100);
    m.heard(info("a", 1), 1000, true);
    expect(m.up().map((x) => x.nodeId)).toEqual(["a"]);
    expect(m.sweep(1100)).toEqual([]);
    expect(m.sweep(1101).map((x) => [x.nodeId, x.state])).toEqual([["a", "down"]]);
    expect(m.sweep(1200)).toEqual([]); // said once
    m.heard(info("a", 1), 1300, true); // the same beat again (a replay): no news
    expect(m.get("a")?.state).toBe("down");
    m.heard(info("a", 2), 1300, true);
    expect([m.get("a")?.state, m.get("a")?.lastSeen]).toEqual(["up", 1300]);
  });

  it("a restarted daemon (a later startedAt) is new whatever its beat", () => {
    const m = new Members("me", 100);
    m.heard(info("a", 500), 0, true);
    m.heard(info("a", 1, undefined, 200), 10, true);
    expect(m.get("a")?.info).toMatchObject({ startedAt: 200, beat: 1 });
    m.rumors([rumor("a", 900, "up", 100)], 20); // a stale rumor of the old run
    expect(m.get("a")?.lastSeen).toBe(10);
  });

  it("left stays left until the daemon speaks again (newer), gets no heartbeats, and is forgotten in time", () => {
    const m = new Members("me", 100, 1000);
    m.heard(info("a", 1), 0, true);
    m.left("a", 50);
    m.left("nobody", 50);
    expect(m.get("a")?.state).toBe("left");
    m.rumors([rumor("a", 9)], 60);
    expect(m.get("a")?.state).toBe("left"); // hearsay does not bring it back
    expect(m.targets()).toEqual([]);
    m.heard(info("a", 2), 70, true);
    expect(m.get("a")?.state).toBe("up");
    m.left("a", 80);
    m.sweep(1000);
    expect(m.get("a")).toBeDefined();
    m.sweep(1081);
    expect(m.get("a")).toBeUndefined();
  });

  it("rumors of others keep members up when their beat rose; up strangers become candidates, never members", () => {
    const m = new Members("me", 100);
    m.heard(info("a", 5), 0, true);
    m.rumors([rumor("a", 5)], 90);
    expect(m.sweep(101).map((x) => x.nodeId)).toEqual(["a"]); // no newer beat: down
    m.rumors([rumor("a", 6)], 150);
    expect([m.get("a")?.state, m.get("a")?.lastSeen, m.get("a")?.info.beat]).toEqual(["up", 150, 6]);
    m.rumors(
      [
        { ...rumor("b", 9), url: "http://b:1/" },
        { ...rumor("c", 9, "down"), url: "http://c:1" },
        { ...rumor("d", 9, "left"), url: "http://d:1" },
        { ...rumor("me", 9), url: "http://me:1" },
      ],
      160,
    );
    expect(m.list().map((x) => x.nodeId)).toEqual(["a"]);
    expect(m.pending()).toEqual(["http://b:1"]);
  });

  it("a leave travels with the gossip, for the run it was said in (not an earlier one)", () => {
    const m = new Members("me", 100);
    m.heard(info("a", 7), 0, true);
    m.rumors([rumor("a", 3, "left", 50)], 10); // a leave of an earlier run of a: no news
    expect(m.get("a")?.state).toBe("up");
    m.rumors([rumor("a", 7, "left")], 20);
    expect([m.get("a")?.state, m.get("a")?.lastSeen]).toEqual(["left", 20]);
    m.heard(info("a", 1, undefined, 200), 30, true); // a restarted a speaks for itself
    expect(m.get("a")?.state).toBe("up");
    m.rumors([rumor("a", 7, "left", 100)], 40); // the old run's leave, heard late
    expect(m.get("a")?.state).toBe("up");
  });

  it("an answer cannot move a known member to another URL; a signed request can", () => {
    const m = new Members("me", 100);
    m.heard(info("a", 1, "http://a:1"), 0, true);
    m.heard(info("a", 2, "http://evil:1"), 5, false);
    expect(m.get("a")?.url).toBe("http://a:1");
    m.heard(info("a", 3, "http://a-moved:1"), 6, true);
    expect(m.get("a")?.url).toBe("http://a-moved:1");
  });

  it("another node id at a member's URL replaces it (the daemon there was made anew)", () => {
    const m = new Members("me", 100);
    m.heard(info("old", 1, "http://h:1"), 0, true);
    m.heard(info("new", 1, "http://h:1"), 5, true);
    expect(m.list().map((x) => x.nodeId)).toEqual(["new"]);
  });

  it("sends each round to a few up members (least recently heard first), one down member, and every candidate", () => {
    const m = new Members("me", 100);
    for (const [id, at] of [
      ["a", 30],
      ["b", 10],
      ["c", 20],
      ["d", 40],
      ["x", 0],
      ["y", 0],
      ["z", 0],
    ] as const) {
      m.heard(info(id), at, true);
    }
    m.sweep(101 + 0); // x, y, z (last heard at 0) go down; a, b, c, d stay up
    m.propose("http://new:1");
    const t = m.targets(2, () => 0);
    expect(t).toEqual([
      { url: "http://h-b:8470", nodeId: "b" },
      { url: "http://h-c:8470", nodeId: "c" },
      { url: "http://h-x:8470", nodeId: "x" },
      { url: "http://new:1" },
    ]);
  });

  it("a few dead members do not starve the live ones of heartbeats", () => {
    const m = new Members("me", 100);
    for (const id of ["d1", "d2", "d3", "d4"]) m.heard(info(id), 0, true);
    for (const id of ["l1", "l2"]) m.heard(info(id), 150, true);
    m.sweep(150); // the four dead ones are down
    const picked = m.targets(3).map((t) => t.nodeId);
    expect(picked.filter((id) => id?.startsWith("l")).sort()).toEqual(["l1", "l2"]);
    expect(picked).toHaveLength(3); // and one probe of the dead
  });

  it("drops a candidate after repeated failures, keeps a seed, and never contacts itself again", () => {
    const m = new Members("me", 100);
    m.propose("http://gone:1");
    m.propose("http://seed:1", true);
    for (let i = 0; i < CANDIDATE_FAILURES; i++) {
      m.failed("http://gone:1");
      m.failed("http://seed:1");
    }
    expect(m.pending()).toEqual(["http://seed:1"]);
    m.propose("http://10.0.0.5:1");
    m.answered("http://10.0.0.6:1", "me", false); // another daemon with this node id: still a candidate
    m.propose("http://10.0.0.6:1");
    expect(m.pending()).toContain("http://10.0.0.6:1");
    m.answered("http://10.0.0.5:1", "me", true);
    m.propose("http://10.0.0.5:1/");
    expect(m.pending()).toEqual(["http://10.0.0.6:1", "http://seed:1"]);
    expect(m.unheardSeeds(["http://10.0.0.5:1", "http://seed:1"])).toEqual(["http://seed:1"]);
  });

  it("tells others whom it knows, with their state and last beat", () => {
    const m = new Members("me", 100);
    m.heard(info("b", 4), 0, true);
    m.heard(info("a", 2), 0, true);
    m.left("b", 1);
    expect(m.rumorsOut()).toEqual([
      { nodeId: "a", url: "http://h-a:8470", state: "up", startedAt: 100, beat: 2 },
      { nodeId: "b", url: "http://h-b:8470", state: "left", startedAt: 100, beat: 4 },
    ]);
  });

  it("ignores itself", () => {
    const m = new Members("me", 100);
    expect(m.heard(info("me"), 0, true)).toBeUndefined();
    expect(m.list()).toEqual([]);
  });
});
