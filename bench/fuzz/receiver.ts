/**
 * Target 3: the receiver protocol (integrations/PROTOCOL.md). Each input is one connection to
 * an engine socket that sends garbage, bad JSON, valid ops with wrong fields, partial or huge
 * lines, floods, or connects and leaves at once. The daemon must keep its sockets, greet a
 * valid hello, and keep /v1/healthz fast.
 */
import { createConnection, type Socket } from "node:net";
import type { ChildDaemon } from "./daemon.ts";
import { FindingError } from "./findings.ts";
import { jsonBytes, mutateBytes, mutateValue, randomValue } from "./mutate.ts";
import type { Rng } from "./rng.ts";
import type { Target } from "./run.ts";

const HELLO = { op: "hello", protocol: 1, pid: 4242, name: "fuzz" };
const MESSAGES = [
  HELLO,
  { op: "ack", update: "u-1", bucket: 0 },
  { op: "error", update: "u-1", bucket: 0, message: "boom" },
  { op: "done", update: "u-1" },
  { op: "abort", update: "u-1", reason: "x" },
  { op: "welcome", protocol: 1, gpu: 0 },
];

function line(value: unknown): Uint8Array {
  return Buffer.concat([jsonBytes(value), Buffer.from("\n")]);
}

/** What one connection sends: chunks written one after another, and whether a welcome must come. */
interface Session {
  chunks: Uint8Array[];
  /** Sends a valid hello first, which must be answered with a welcome within 2 s. */
  hello: boolean;
  /** Connections opened and dropped at once before this one. */
  flaps: number;
}

export function session(rng: Rng): Session {
  const s: Session = { chunks: [], hello: false, flaps: 0 };
  const lines = (n: number, make: () => Uint8Array) => {
    for (let i = 0; i < n; i++) s.chunks.push(make());
  };
  switch (rng.int(0, 9)) {
    case 0:
      lines(rng.int(1, 4), () => rng.bytes(rng.int(1, 4096)));
      break;
    case 1:
      lines(rng.int(1, 5), () => Buffer.concat([mutateBytes(jsonBytes(rng.pick(MESSAGES)), rng), Buffer.from("\n")]));
      break;
    case 2:
      lines(rng.int(1, 5), () => line(mutateValue(rng.pick(MESSAGES), rng)));
      break;
    case 3:
      s.hello = true;
      lines(rng.int(0, 5), () => line(rng.chance(0.5) ? mutateValue(rng.pick(MESSAGES), rng) : randomValue(rng)));
      break;
    case 4:
      s.chunks.push(jsonBytes(mutateValue(HELLO, rng)).subarray(0, rng.int(1, 40)));
      break;
    case 5:
      s.flaps = rng.int(1, 10);
      break;
    case 6:
      if (rng.chance(0.05)) s.chunks.push(Buffer.alloc((1 << 20) + rng.int(1, 4096), rng.chance(0.5) ? "a" : "é"));
      else s.chunks.push(Buffer.alloc(rng.int(1000, 200_000), "{"));
      if (rng.chance(0.5)) s.chunks.push(Buffer.from("\n"));
      break;
    case 7:
      s.chunks.push(line(HELLO), Buffer.from(`${JSON.stringify(MESSAGES[1])}\n`.repeat(rng.int(900, 1200))));
      break;
    case 8: {
      // a message cut inside a multi-byte character, and CRLF line ends
      const text = Buffer.from(`${JSON.stringify({ ...HELLO, name: "é💥".repeat(rng.int(1, 50)) })}\r\n`);
      const at = rng.int(1, text.length - 1);
      s.chunks.push(text.subarray(0, at), text.subarray(at));
      break;
    }
    default:
      s.chunks.push(
        Buffer.concat(Array.from({ length: rng.int(2, 50) }, () => line(rng.pick([...MESSAGES, randomValue(rng)])))),
      );
  }
  return s;
}

function connect(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    sock.once("connect", () => resolve(sock));
    sock.once("error", reject);
  });
}

/** Resolves with the text received until `ms` pass or the daemon closes the connection. */
function listen(sock: Socket, ms: number, until: (text: string) => boolean): Promise<string> {
  return new Promise((resolve) => {
    let text = "";
    const done = () => {
      clearTimeout(timer);
      resolve(text);
    };
    const timer = setTimeout(done, ms);
    sock.on("data", (c: Buffer) => {
      text += c.toString();
      if (until(text)) done();
    });
    sock.once("close", done);
  });
}

/** Plays a session; returns what the daemon answered to the hello ("" without one). */
async function play(path: string, s: Session, rng: Rng): Promise<string> {
  for (let i = 0; i < s.flaps; i++) (await connect(path)).destroy();
  const sock = await connect(path);
  sock.on("error", () => undefined); // the daemon may cut us off mid-write
  let greeting = "";
  if (s.hello) {
    const heard = listen(sock, 2000, (t) => t.includes('"welcome"'));
    sock.write(line(HELLO));
    greeting = await heard;
  }
  const heard = listen(sock, rng.int(0, 30), () => false);
  for (const chunk of s.chunks) if (!sock.destroyed) sock.write(chunk);
  await heard;
  sock.destroy();
  return greeting;
}

export function receiverTarget(d: ChildDaemon): Target {
  return {
    name: "receiver",
    concurrency: 4,
    async one(rng, index) {
      const s = session(rng);
      const input = Buffer.concat(s.chunks);
      let heard: string;
      try {
        heard = await play(d.socketPath(index % 2), s, rng);
      } catch (err) {
        throw new FindingError(`the engine socket refused a connection: ${(err as Error).message}`, input);
      }
      if (s.hello && !heard.includes('"welcome"')) {
        throw new FindingError(
          `a valid hello got no welcome within 2 s (heard ${JSON.stringify(heard.slice(0, 200))})`,
          input,
        );
      }
      if (input.byteLength > 100_000) {
        const why = await d.unhealthy();
        if (why) throw new FindingError(`after a ${input.byteLength}-byte session: ${why}`, input);
      }
    },
  };
}
