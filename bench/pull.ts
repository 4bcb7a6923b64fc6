/**
 * Pull throughput over UCX between daemons on loopback (issue 12): a checkpoint of --gb GB
 * (default 4) in /dev/shm, registered in place by two source daemons; a third pulls it from
 * one source, then from both. iperf3 (Debian's package) measures loopback TCP in the same run:
 * the one-source pull is reported as a ratio to it (target 0.8), the two-source pull as a
 * ratio to one source. Every pull is checked whole (every piece's hash, and the fingerprint).
 *   node --import tsx bench/pull.ts [--gb 4] [--files 8] [--transports tcp] [--ucx-path libucp.so.0] [--lanes 4]
 */
import { execFileSync, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { encodeHeader } from "../daemon/checkpoints/safetensors.ts";
import { arg, DaemonProcess, type Json, leftovers, Scratch, sleep, table } from "./lib/daemon.ts";

const GB = arg("gb", 4);
const FILES = arg("files", 8);
/** The value after --name, or the fallback. */
function option(name: string, fallback: string): string {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? (process.argv[at + 1] ?? fallback) : fallback;
}
const TRANSPORTS = option("transports", "tcp");
const UCX_PATH = option("ucx-path", "libucp.so.0");
const LANES = arg("lanes", 4);
const TENSOR = 64 << 20;

/** FILES safetensors files of random bf16 tensors of 64 MiB, GB in all. */
function writeCheckpoint(dir: string): number {
  const perFile = Math.max(1, Math.round((GB * 2 ** 30) / TENSOR / FILES));
  const chunk = Buffer.alloc(TENSOR);
  let total = 0;
  for (let f = 0; f < FILES; f++) {
    const tensors = Array.from({ length: perFile }, (_, i) => ({
      name: `model.layers.${f * perFile + i}.weight`,
      dtype: "BF16",
      shape: [TENSOR / 2],
      bytes: TENSOR,
    }));
    const fd = openSync(join(dir, `model-${f + 1}-of-${FILES}.safetensors`), "w");
    const header = encodeHeader(tensors);
    writeSync(fd, header);
    for (let i = 0; i < perFile; i++) writeSync(fd, randomFillSync(chunk));
    closeSync(fd);
    total += header.byteLength + perFile * TENSOR;
  }
  return total;
}

/** Loopback TCP throughput by iperf3, GB/s (as many streams as lanes, 5 s). */
async function iperf3(): Promise<number> {
  const port = String(15201 + (process.pid % 1000));
  const server = spawn("iperf3", ["-s", "-1", "-p", port], { stdio: "ignore" });
  await sleep(300);
  try {
    const args = ["-c", "127.0.0.1", "-p", port, "-t", "5", "-P", String(LANES), "-J"];
    const out = JSON.parse(execFileSync("iperf3", args).toString());
    return out.end.sum_received.bits_per_second / 8 / 1e9;
  } finally {
    server.kill();
  }
}

async function seesUp(d: DaemonProcess, n: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const peers = (await d.api("GET", "/v1/peers")).body.peers as Json[];
    if (peers.filter((p) => p.state === "up" && p.versions.length > 0).length >= n) return;
    await sleep(50);
  }
  throw new Error("the sources were never seen up");
}

async function pull(d: DaemonProcess, from: string[], fingerprint: string): Promise<{ wall: number; v: Json }> {
  const t0 = performance.now();
  const res = await d.api("POST", "/v1/checkpoints", { name: "big", pull: { from, fingerprint } });
  const wall = (performance.now() - t0) / 1000;
  if (res.status !== 201) throw new Error(`pull failed: ${JSON.stringify(res.body)}`);
  const mine = (await d.api("GET", "/v1/peers")).body.self.versions.find((v: Json) => v.name === "big");
  if (mine?.fingerprint !== fingerprint) throw new Error("the pulled version has another fingerprint");
  await d.api("DELETE", `/v1/checkpoints/${res.body.id}`);
  return { wall, v: res.body };
}

async function main() {
  const scratch = new Scratch();
  const daemons: DaemonProcess[] = [];
  try {
    const dir = scratch.dir("/dev/shm");
    const bytes = writeCheckpoint(dir);
    const ucx = [
      "--ucx-lanes",
      String(LANES),
      "--ucx-transports",
      TRANSPORTS,
      "--ucx-path",
      UCX_PATH,
      "--pull-chunk-bytes",
      String(16 << 20),
    ];
    const s1 = await DaemonProcess.start(scratch, { args: ucx });
    daemons.push(s1);
    const s2 = await DaemonProcess.start(scratch, { args: [...ucx, "--peers", s1.url] });
    daemons.push(s2);
    for (const s of [s1, s2]) {
      const r = await s.api("POST", "/v1/checkpoints", { name: "big", dir });
      if (r.status !== 201) throw new Error(JSON.stringify(r.body));
    }
    const fingerprint = (await s1.api("GET", "/v1/peers")).body.self.versions[0].fingerprint as string;
    const r = await DaemonProcess.start(scratch, { args: [...ucx, "--peers", s1.url] });
    daemons.push(r);
    await seesUp(r, 2);
    const floor = await iperf3();
    await pull(r, [s1.url], fingerprint); // warm: UCX's first connection, page faults of the first pinning
    const one = await pull(r, [s1.url], fingerprint);
    const two = await pull(r, [s1.url, s2.url], fingerprint);
    const rate = (x: { v: Json }) => x.v.progress.pull.gbps as number;
    console.log(
      `pull of ${(bytes / 1e9).toFixed(2)} GB over UCX (${TRANSPORTS}) on loopback; ${FILES} files, ranges of 16 MiB, ${LANES} lane(s) per daemon`,
    );
    console.log(
      table(
        ["what", "GB/s", "ratio", "wall s (with pinning)"],
        [
          [`iperf3, ${LANES} TCP stream(s)`, floor.toFixed(2), "1.00 (floor)", ""],
          [
            "pull from one source",
            rate(one).toFixed(2),
            `${(rate(one) / floor).toFixed(2)} of iperf3`,
            one.wall.toFixed(2),
          ],
          [
            "pull from two sources",
            rate(two).toFixed(2),
            `${(rate(two) / rate(one)).toFixed(2)} of one source`,
            two.wall.toFixed(2),
          ],
        ],
      ),
    );
    const split = two.v.progress.pull.sources.map(
      (s: Json) => `${s.nodeId.slice(0, 8)} ${(s.bytes / 1e9).toFixed(2)} GB`,
    );
    console.log(`two sources took: ${split.join(", ")}; every piece verified (ckpt hash), fingerprint equal`);
  } catch (err) {
    // A daemon that died says why in its log (a crash, a backtrace): print what each kept.
    for (const d of daemons)
      console.error(
        `--- daemon ${d.url} (exit ${d.proc.exitCode ?? d.proc.signalCode}):\n${d.logs.slice(-20).join("\n")}`,
      );
    throw err;
  } finally {
    scratch.cleanup();
    const left = leftovers();
    if (left.length) console.log(`left behind: ${left.join(", ")}`);
  }
}

await main();
