/**
 * A reference receiver in a process of its own, for faults that need a SIGKILL: connects to
 * the socket, then writes one JSON line per message it sees (`{"op", "bucket"?}`) and, after
 * answering `end`, `{"op": "hashes", update, hashes}`.
 * Usage: node --import tsx bench/lib/receiver-process.ts SOCKET NAME [BEHAVIOUR_JSON]
 */
import { ReferenceReceiver } from "../../test/reference-receiver.ts";

const [socket, name, behaviour] = process.argv.slice(2);
const r = new ReferenceReceiver(socket as string, name as string, JSON.parse(behaviour ?? "{}"));
await r.connect();
const out = (m: unknown) => process.stdout.write(`${JSON.stringify(m)}\n`);
out({ op: "ready", pid: process.pid });
let reported = 0;
const timer = setInterval(() => {
  for (const m of r.seen.slice(reported)) out({ op: m.op, bucket: m.bucket, update: m.update });
  reported = r.seen.length;
  for (const [update, hashes] of r.hashes) {
    out({ op: "hashes", update, hashes: Object.fromEntries(hashes) });
    r.hashes.delete(update);
  }
}, 2);
process.on("SIGTERM", () => {
  clearInterval(timer);
  void r.close().then(() => process.exit(0));
});
