/** Which daemons an update spans. */
import { describe, expect, it } from "vitest";
import type { Member } from "./members.ts";
import { updateSpan } from "./select.ts";

const member = (nodeId: string, state: Member["state"]): Member => ({
  nodeId,
  url: `http://${nodeId}:1`,
  state,
  lastSeen: 0,
  info: { nodeId, url: `http://${nodeId}:1`, backend: "host", gpus: 1, versions: [], startedAt: 0, beat: 0 },
});

describe("updateSpan", () => {
  const members = [member("a", "up"), member("b", "down"), member("c", "left"), member("d", "up")];

  it("spans the members that are up and the seeds not heard from yet; names those left out", () => {
    // (Members.unheardSeeds gives the seeds that are neither this daemon nor a member)
    expect(updateSpan(members, ["http://new:1"])).toEqual({
      urls: ["http://a:1", "http://d:1", "http://new:1"],
      leftOut: [
        { nodeId: "b", url: "http://b:1", state: "down" },
        { nodeId: "c", url: "http://c:1", state: "left" },
      ],
    });
  });

  it("narrows to the peers asked for, by node id or URL", () => {
    expect(updateSpan(members, ["http://new:1"], ["d", "http://b:1/", "http://new:1"])).toEqual({
      urls: ["http://d:1", "http://new:1"],
      leftOut: [{ nodeId: "b", url: "http://b:1", state: "down" }],
    });
    expect(updateSpan(members, [], [])).toEqual({ urls: [], leftOut: [] });
  });

  it("refuses a peer it does not know, naming it", () => {
    expect(() => updateSpan(members, [], ["a", "zz", "http://x:1"])).toThrow(
      "peers: zz, http://x:1 is no daemon this one knows (GET /v1/peers)",
    );
  });
});
