#!/usr/bin/env bash
# Broadcast updates of the standard checkpoint (../shared/bench/SPEC.md) on the GPU machine:
#   source .device/boot.sh; bash bench/update.sh [layers] [updates]
# with cuda-lib/build carried. One daemon owning every GPU of the machine, the SPEC consumer
# (integrations/torch_engine.py) on each GPU. Measures in one run: the floor (pinned
# host-to-device GB/s per GPU with all GPUs copying at once), the update time from the API
# (median of N after a warm-up), extra GPU memory, the consumers' bit-exact checks, and the
# end-to-end time of a 1 MiB update. VERIFY=alt: the warm-up and every other update after it
# verify their buckets on the GPUs (issue 14: the ratio to the floor may rise by 0.03 at most).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
layers=${1:-36}
n=${2:-5}
# GPUS=1 on a machine with more: the daemon and the engine see GPU 0 only.
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))
dir=/dev/shm/q8b
mem() { nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-gpu=memory.used --format=csv,noheader,nounits | paste -sd, -; }

if [ -f "$dir/q8b.json" ]; then cp "$dir/q8b.json" "$out/q8b.json"; else
  python3 bench/make_q8b.py --layers "$layers" --dir "$dir" | tee "$out/q8b.json"
  cp "$out/q8b.json" "$dir/q8b.json"
fi
./cuda-lib/build/ckpt-gpu-test --bandwidth 4 | tee "$out/floor.txt"
mem_before=$(mem)

# DAEMONS=2 (with 2 GPUs): one daemon per GPU, the first coordinating with the second as its
# peer; both hold the checkpoint. Otherwise one daemon owns every GPU.
daemons=${DAEMONS:-1}
states=() pids=() tokens=()
# Daemons that update together sign their peer requests with one cluster secret.
secret=$(mktemp)  # 0600
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$secret"
for d in $(seq 0 $((daemons - 1))); do
  st=$(mktemp -d); states+=("$st")
  if [ "$daemons" = 1 ]; then vis=$CUDA_VISIBLE_DEVICES; else vis=$d; fi
  peers=""; [ "$daemons" = 2 ] && [ "$d" = 0 ] && peers="--peers http://127.0.0.1:8471"
  CUDA_VISIBLE_DEVICES=$vis node --import tsx daemon/main.ts --backend cuda --port $((8470 + d)) --state-dir "$st" \
    --cluster-secret-file "$secret" $peers --log-level info >"$out/daemon-$d.log" 2>&1 &
  pids+=($!)
done
daemon=${pids[0]}
for d in $(seq 0 $((daemons - 1))); do
  for _ in $(seq 300); do curl -sf localhost:$((8470 + d))/v1/healthz >/dev/null && break; sleep 0.1; done
  tokens+=("$(cut -d: -f2 "${states[$d]}/tokens")")  # the admin token each daemon made at its first start
done
mem_daemon=$(mem)
for d in $(seq 0 $((daemons - 1))); do
  curl -sf -H "Authorization: Bearer ${tokens[$d]}" -X POST localhost:$((8470 + d))/v1/checkpoints -H 'content-type: application/json' \
    -d "{\"name\":\"q8b\",\"dir\":\"$dir\"}" >"$out/register-$d.json" || { cat "$out/daemon-$d.log"; exit 1; }
done

engines=()
for g in $(seq 0 $((gpus - 1))); do
  if [ "$daemons" = 1 ]; then sock="${states[0]}/sockets/gpu-$g.sock"; vis=$CUDA_VISIBLE_DEVICES; dev="cuda:$g"
  else sock="${states[$g]}/sockets/gpu-0.sock"; vis=$g; dev="cuda:0"; fi
  CUDA_VISIBLE_DEVICES=$vis PYTHONUNBUFFERED=1 python3 integrations/torch_engine.py --socket "$sock" --device "$dev" \
    --layers "$layers" --updates $((n + 1)) >"$out/engine-$g.jsonl" 2>"$out/engine-$g.err" &
  engines+=($!)
done
for _ in $(seq 600); do
  connected=0
  for d in $(seq 0 $((daemons - 1))); do
    c=$(curl -s -H "Authorization: Bearer ${tokens[$d]}" localhost:$((8470 + d))/v1/status | python3 -c 'import json,sys; print(sum(len(g["receivers"]) for g in json.load(sys.stdin)["gpus"]))')
    connected=$((connected + c))
  done
  [ "$connected" = "$gpus" ] && break
  sleep 0.2
done
mem_engines=$(mem)

# GPU memory is sampled only while an update is in flight (the consumers' checks between
# updates regenerate tensors and are not part of an update).
: >"$out/updates.jsonl"
: >"$out/mem-samples.txt"
for i in $(seq 0 "$n"); do
  sleep 1
  echo "--" >>"$out/mem-samples.txt"
  (while true; do mem; sleep 0.02; done) >>"$out/mem-samples.txt" &
  sampler=$!
  verify=false; [ "${VERIFY:-}" = alt ] && [ $((i % 2)) = 0 ] && verify=true
  curl -s -H "Authorization: Bearer ${tokens[0]}" -w '\n%{time_total}\n' -X POST localhost:8470/v1/updates -H 'content-type: application/json' \
    -d "{\"checkpoint\":\"q8b\",\"verify\":$verify}" >"$out/u.txt"
  kill "$sampler"
  python3 -c '
import json, sys
body, wall = open(sys.argv[1]).read().strip().rsplit("\n", 1)
r = json.loads(body)
r = r.get("error", {}).get("details", r) if "error" in r else r
print(json.dumps({"run": int(sys.argv[2]), "wall": float(wall), "state": r.get("state"), "timings": r.get("timings"), "verify": r.get("verify"),
                  "bytes": r.get("progress", {}).get("bytes"), "error": r.get("error")}))' "$out/u.txt" "$i" >>"$out/updates.jsonl"
done
for pid in "${engines[@]}"; do wait "$pid"; done
# The last update's per-bucket timeline on each daemon (ms from its start).
last=$(python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().rsplit("\n", 1)[0])
print(r.get("id") or r["error"]["details"]["id"])' "$out/u.txt")
for d in $(seq 0 $((daemons - 1))); do
  # A peer records its part as u-N@<coordinator's node id>.
  [ "$d" = 0 ] && id=$last || id="$last@$(curl -s -H "Authorization: Bearer ${tokens[0]}" localhost:8470/v1/status | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodeId"])')"
  curl -s -H "Authorization: Bearer ${tokens[$d]}" "localhost:$((8470 + d))/v1/updates/$id?buckets=true" >"$out/timeline-$d.json"
done

# A 1 MiB checkpoint, end to end from the API, to a plain receiver per GPU.
all_states=$(IFS=,; echo "${states[*]}")
python3 bench/tiny_update.py --state "$all_states" --gpus $((gpus / daemons)) >"$out/tiny.json" 2>"$out/tiny.err"
for pid in "${pids[@]}"; do kill -TERM "$pid"; wait "$pid"; done
rm -f "$secret"

python3 - "$out" "$gpus" "$mem_before" "$mem_daemon" "$mem_engines" <<'PY'
import json, re, sys, pathlib, statistics as st
out, gpus = pathlib.Path(sys.argv[1]), int(sys.argv[2])
before, daemon, engines = ([int(x) for x in a.split(",")] for a in sys.argv[3:6])
floor_txt = out.joinpath("floor.txt").read_text()
per = [float(x) for x in re.findall(r"device \d+ .*?: ([\d.]+) GB/s", floor_txt)]
together = re.findall(r"all \d+ devices at once.*?([\d.]+) GB/s per device", floor_txt)
bw = min(float(x) for x in together) if together else min(per)
q = json.loads(out.joinpath("q8b.json").read_text().strip().splitlines()[-1])
floor = q["bytes"] / gpus / (bw * 1e9)
runs = [json.loads(l) for l in out.joinpath("updates.jsonl").read_text().splitlines()]
timed = [r for r in runs[1:] if r["state"] == "succeeded"]
walls = sorted(r["wall"] for r in timed)
# Per update window after the warm-up: the rise of used memory over its first sample (taken
# just before the request), the largest over those windows. (The warm-up's window also catches
# the consumer's first check allocating, right after `done`.)
windows = [[[int(x) for x in l.split(",")] for l in w.split() if l]
           for w in out.joinpath("mem-samples.txt").read_text().split("--")]
windows = [w for w in windows if w][1:]
rise = [max(max(s[g] for s in w) - w[0][g] for w in windows) for g in range(gpus)] if windows else None
checks = []
for g in range(gpus):
    lines = [json.loads(l) for l in out.joinpath(f"engine-{g}.jsonl").read_text().splitlines() if l.startswith("{")]
    checks.append(f"GPU{g}: {sum(l['ok'] for l in lines)}/{len(lines)} ok")
tiny = json.loads(out.joinpath("tiny.json").read_text() or "{}")
print(f"device: {gpus} GPU(s), {__import__('os').environ.get('DAEMONS', '1')} daemon(s); checkpoint {q['tensors']} tensors, {q['bytes']} bytes")
print(f"floor: {bw:.2f} GB/s per GPU (all copying at once) -> {floor:.3f} s")
if walls:
    med = st.median(walls)
    print(f"update (API wall, {len(walls)} after warm-up): median {med:.3f} s, min {walls[0]:.3f}, max {walls[-1]:.3f}; ratio {med / floor:.3f}")
    both = {v: sorted(r["wall"] for r in timed if bool(r.get("verify")) == v) for v in (False, True)}
    if both[True] and both[False]:
        plain, checked = st.median(both[False]), st.median(both[True])
        spent = st.median(r["timings"].get("verifySeconds", 0) for r in timed if r.get("verify"))
        print(f"verification: {len(both[True])} verified updates, median {checked:.3f} s = ratio {checked / floor:.3f}, "
              f"against {plain:.3f} s = {plain / floor:.3f} unverified: +{(checked - plain) / floor:.3f} (target +0.03); "
              f"hashing on the GPU took {spent:.3f} s summed over buckets")
print(f"failed updates: {sum(r['state'] != 'succeeded' for r in runs)} of {len(runs)}  " + "  ".join(checks))
print("GPU MiB  before: %s  with the daemon: %s  with the engines: %s" % (before, daemon, engines))
print("daemon's memory per GPU (MiB, all of it allocated at start): %s; rise during an update: %s" % (
    [d - b for d, b in zip(daemon, before)], rise))
print(f"1 MiB update end to end: {tiny}")
for d in range(int(__import__('os').environ.get('DAEMONS', '1'))):
    tl = json.loads(out.joinpath(f"timeline-{d}.json").read_text()).get("buckets", [])
    owners = sorted({b["owner"] for b in tl})
    per = {o: sum(b["bytes"] for b in tl if b["owner"] == o) for o in owners}
    last = {o: max(b["landed"] for b in tl if b["owner"] == o) for o in owners}
    print(f"daemon {d}, last update: bytes copied per GPU {per}; last bucket landed (ms) {last}; "
          f"last ack {max((b['acked'] for b in tl), default=0):.1f} ms")
PY
