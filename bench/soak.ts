/**
 * Soak (issue 10): 1000 updates of a small checkpoint into two reference receivers (host
 * backend, 2 GPUs), each checked against the manifest; the daemon's RSS (VmRSS of
 * /proc/<pid>/status) after a warm-up and at the end. Target: RSS growth under 5%, every
 * update succeeded with 0 bytes differing.
 * The warm-up is 1000 updates: V8 sizes its heap up over about the first thousand (RSS
 * 97 -> 124 MiB here, then flat: 126.7 MiB after 5000), and that sizing is not a leak. The
 * growth during the warm-up is printed too.
 * Usage: node --import tsx bench/soak.ts [--updates 1000] [--warmup 1000] [--after-gc]
 * --after-gc (a diagnosis): both RSS samples are taken right after a full GC of the daemon, which
 * a heap snapshot forces (NODE_OPTIONS=--heapsnapshot-signal=SIGUSR2); what is then left of the
 * growth is memory the daemon still holds, not garbage V8 had not collected yet.
 */
import { readdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import {
  arg,
  DaemonProcess,
  leftovers,
  manifestOf,
  pushAndCheck,
  receivers,
  Scratch,
  sleep,
  table,
  writeCheckpoint,
} from "./lib/daemon.ts";

const UPDATES = arg("updates", 1000);
const WARMUP = arg("warmup", 1000);
const AFTER_GC = process.argv.includes("--after-gc");
const GROWTH_TARGET = 5;

/** Makes the daemon write a heap snapshot (a full GC first) into `dir`, waits until it is written, removes it. */
async function fullGc(d: DaemonProcess, dir: string): Promise<void> {
  d.proc.kill("SIGUSR2");
  for (let last = -1; ; await sleep(200)) {
    const files = readdirSync(dir);
    const size = files.reduce((sum, f) => sum + statSync(join(dir, f)).size, 0);
    if (files.length > 0 && size === last) break;
    last = size;
  }
  for (const f of readdirSync(dir)) rmSync(join(dir, f));
}

async function main(): Promise<number> {
  const scratch = new Scratch();
  const snapshots = scratch.dir();
  const env = { NODE_OPTIONS: `--heapsnapshot-signal=SIGUSR2 --diagnostic-dir=${snapshots}` };
  const d = await DaemonProcess.start(scratch, { hostDevices: 2, ...(AFTER_GC ? { env } : {}) });
  const { dir } = writeCheckpoint(scratch, 128);
  const reg = await d.api("POST", "/v1/checkpoints", { name: "m", dir });
  if (reg.status !== 201) throw new Error(`registration: ${reg.status} ${JSON.stringify(reg.body)}`);
  const manifest = await manifestOf(d, "m@1");
  const bytes = [...manifest.values()].reduce((s, t) => s + t.bytes, 0);
  const rs = await receivers(d, 2);

  let bad = 0;
  let firstBad = "";
  let differing = 0;
  let warmRss = 0;
  let warm: Awaited<ReturnType<DaemonProcess["memory"]>> | undefined;
  let warmAt = 0;
  const samples: [number, number][] = [[0, await d.rssKiB()]];
  for (let n = 1; n <= WARMUP + UPDATES; n++) {
    const res = await pushAndCheck(d, "m@1", rs, manifest);
    differing += res.differing;
    if (!res.ok) {
      bad++;
      firstBad ||= `update ${n}: ${res.status} ${JSON.stringify(res.body).slice(0, 200)}`;
    }
    for (const r of rs) r.seen.length = 0;
    if (n === WARMUP) {
      // Twice: the first snapshot's own buffers stay with the allocator, and would count as growth.
      if (AFTER_GC) for (let i = 0; i < 2; i++) await fullGc(d, snapshots);
      warm = await d.memory();
      warmRss = warm.VmRSS;
      warmAt = performance.now();
    }
    if (n % 100 === 0 || n === WARMUP) samples.push([n, await d.rssKiB()]);
  }
  const seconds = (performance.now() - warmAt) / 1000;
  const mib = (kib: number) => (kib / 1024).toFixed(1);
  const startRss = samples[0]?.[1] ?? 0;
  const warmupGrowth = ((warmRss - startRss) / startRss) * 100;
  if (AFTER_GC) await fullGc(d, snapshots);
  const end = await d.memory();
  const endRss = end.VmRSS;
  const growth = ((endRss - warmRss) / warmRss) * 100;
  for (const r of rs) await r.close();
  await d.kill("SIGTERM");
  const exit = await d.exited;
  scratch.cleanup();

  console.log(
    `daemon: host backend, 2 GPUs, 2 reference receivers; checkpoint m@1 ${manifest.size} tensors, ${bytes} bytes`,
  );
  console.log(
    table(
      [
        "updates",
        "updates/s",
        `RSS after warm-up${AFTER_GC ? ", full GC" : ""} (MiB)`,
        `RSS at end${AFTER_GC ? ", full GC" : ""} (MiB)`,
        "growth",
        "failed or differing",
        "bytes differing",
      ],
      [
        [
          `${UPDATES} (after ${WARMUP} warm-up: RSS ${mib(startRss)} -> ${mib(warmRss)}, ${warmupGrowth.toFixed(1)}%)`,
          (UPDATES / seconds).toFixed(1),
          mib(warmRss),
          mib(endRss),
          `${growth.toFixed(2)}% (target < ${GROWTH_TARGET}%)`,
          bad,
          differing,
        ],
      ],
    ),
  );
  console.log(`RSS (MiB) after n updates: ${samples.map(([n, kib]) => `${n}: ${mib(kib)}`).join(", ")}`);
  const parts = (m: typeof end | undefined) =>
    `anon ${mib(m?.RssAnon ?? 0)}, file ${mib(m?.RssFile ?? 0)}, shmem ${mib(m?.RssShmem ?? 0)}`;
  console.log(`RSS parts (MiB): after warm-up ${parts(warm)}; at end ${parts(end)}`);
  if (firstBad) console.log(`first failure: ${firstBad}`);
  const left = leftovers();
  const met = growth < GROWTH_TARGET && bad === 0 && left.length === 0;
  console.log(
    `target ${met ? "met" : "MISSED"}; daemon exit ${exit} on SIGTERM; left in /dev/shm and /tmp: ${left.length ? left.join(" ") : "nothing"}`,
  );
  return met ? 0 : 1;
}

process.exit(await main());
