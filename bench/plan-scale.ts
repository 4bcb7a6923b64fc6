/**
 * Planning at fleet scale (issue 12): a broadcast of a 1 T-parameter checkpoint (bf16, 2 TB)
 * over 4096 GPUs of 512 simulated daemons, manifests generated, no bytes: the peers' answers
 * checked and ranked (planWithPeers), then the buckets planned (planBuckets) for the hosts that
 * hold the checkpoint. Target: under 100 ms for the whole plan.
 *   node --import tsx bench/plan-scale.ts [--daemons 512] [--gpus 8] [--holders 1] [--tensors 150000] [--runs 5]
 */
import { type PlanTensor, planBuckets } from "../daemon/update/plan.ts";
import { planWithPeers } from "../daemon/update/plan-peers.ts";
import { arg, table } from "./lib/daemon.ts";

const DAEMONS = arg("daemons", 512);
const GPUS = arg("gpus", 8);
const HOLDERS = arg("holders", 1);
const TENSORS = arg("tensors", 150_000);
const RUNS = arg("runs", 5);
const PARAMS = 1e12;
const SLOT_BYTES = 256 << 20;
const SLOTS = 16;
const TARGET_MS = 100;

/** A MoE-like manifest: many experts' matrices, some large embeddings, small norms; 2 bytes per parameter. */
function manifest(): PlanTensor[] {
  const weights = Array.from({ length: TENSORS }, (_, i) => (i % 97 === 0 ? 0.01 : i % 7 === 0 ? 40 : 1 + (i % 13)));
  const total = weights.reduce((a, b) => a + b, 0);
  const files = 400;
  const perFile = Math.ceil(TENSORS / files);
  const offsets = new Array<number>(files).fill(0);
  return weights.map((w, i) => {
    const bytes = Math.max(2, Math.round(((w / total) * PARAMS * 2) / 2) * 2);
    const file = Math.floor(i / perFile);
    const t = {
      name: `model.layers.${i % 61}.mlp.experts.${i}.weight`,
      dtype: "BF16",
      shape: [bytes / 2],
      bytes,
      file,
      offset: offsets[file] as number,
    };
    offsets[file] = (offsets[file] as number) + bytes;
    return t;
  });
}

function peers(fp: number) {
  return Array.from({ length: DAEMONS - 1 }, (_, i) => ({
    url: `http://10.${(i >> 8) & 255}.${i & 255}.1:8470`,
    info: {
      nodeId: `node-${i}`,
      gpus: GPUS,
      slots: SLOTS,
      slotBytes: SLOT_BYTES,
      ...(i < HOLDERS - 1 ? { holds: `m@${fp}` } : {}),
    },
  }));
}

const tensors = manifest();
const bytes = tensors.reduce((s, t) => s + t.bytes, 0);
const answers = peers(1);
const times: number[] = [];
let buckets = 0;
let nranks = 0;
for (let run = 0; run < RUNS + 1; run++) {
  const t0 = performance.now();
  const plan = planWithPeers({ gpus: GPUS, slots: SLOTS, slotBytes: SLOT_BYTES, peers: answers });
  const planned = planBuckets(tensors, { bucketBytes: SLOT_BYTES, owners: plan.owners, slots: SLOTS });
  const ms = performance.now() - t0;
  if (run > 0) times.push(ms); // the first run warms the JIT up
  buckets = planned.length;
  nranks = plan.nranks;
}
times.sort((a, b) => a - b);
const median = times[Math.floor(times.length / 2)] as number;
console.log(
  `checkpoint: ${TENSORS} tensors, ${(bytes / 1e12).toFixed(2)} TB (1 T bf16 parameters) in 400 files; ${DAEMONS} daemons x ${GPUS} GPUs = ${nranks} ranks; ${HOLDERS} host(s) hold it`,
);
console.log(
  table(
    ["runs", "median ms", "min ms", "max ms", "buckets", "target"],
    [
      [
        RUNS,
        median.toFixed(1),
        (times[0] as number).toFixed(1),
        (times.at(-1) as number).toFixed(1),
        buckets,
        `< ${TARGET_MS} ms`,
      ],
    ],
  ),
);
console.log(`target ${median < TARGET_MS ? "met" : "MISSED"}: median ${median.toFixed(1)} ms (< ${TARGET_MS})`);
process.exit(median < TARGET_MS ? 0 : 1);
