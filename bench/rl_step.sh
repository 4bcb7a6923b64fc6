#!/usr/bin/env bash
# RL steps on the GPU machine (issue 13), with the standard checkpoint and consumer of
# ../shared/bench/SPEC.md:
#   source .device/boot.sh; bash bench/rl_step.sh [layers] [steps]
# with cuda-lib/build carried. One daemon (CUDA backend, maxVersions 1) on GPU 0, the SPEC
# consumer (integrations/torch_engine.py --steps: update u must carry step u's contents, bit
# for bit) and a trainer (bench/rl_trainer.py) holding q8b on the same GPU. Measures in one
# run: the host-to-device floor (ckpt-gpu-test --bandwidth 4) and the device-to-host floor
# (the trainer), staging-area commits, and per RL step the push (push_cuda), the update and the
# total. Targets: push <= 1.2 x bytes / D2H GB/s; total <= 2.3 x bytes / H2D GB/s; commit of
# a staged version <= 0.35 s.
# CHANGING_EVERY=N: after step 0 only every N-th tensor changes, and the consumer says partial
# (updates leave out what it holds); BASE=1: the trainer pushes only the changed tensors, on
# the previous version; COMMITS=0 skips the staging commits. SPARSE=1 (issue 14): each step
# changes 1% of the elements of 90% of the tensors, the consumer takes deltas, every update
# waits for its version's deltas, and a last update changes one element. Targets: an update
# moves <= 5% of the bytes in <= 0.1 x the full update's H2D floor; one element < 5 ms.
# ATOMIC=1: every update is an atomic cutover (the consumer stages up to 24 GB, then commits);
# reports the stage and commit times and each commit's window (target: window <= 5 ms).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
layers=${1:-36}
steps=${2:-7}
warmup=2
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
./cuda-lib/build/ckpt-gpu-test --bandwidth 4 | tee "$out/floor.txt"
st=$(mktemp -d)
node --import tsx daemon/main.ts --backend cuda --port 8470 --state-dir "$st" --max-versions 1 \
  --log-level "${LOG_LEVEL:-info}" >"$out/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 300); do curl -sf localhost:8470/v1/healthz >/dev/null && break; sleep 0.1; done
token=$(cut -d: -f2 "$st/tokens")
PYTHONUNBUFFERED=1 python3 integrations/torch_engine.py --socket "$st/sockets/gpu-0.sock" --device cuda:0 \
  --layers "$layers" --steps ${CHANGING_EVERY:+--partial --changing-every "$CHANGING_EVERY"} \
  $([ "${SPARSE:-0}" = 1 ] && echo --sparse --hold-after "$steps" --updates $((steps + 1)) || echo --updates "$steps") \
  $([ "${ATOMIC:-0}" = 1 ] && echo --stage-bytes $((24 << 30))) \
  >"$out/engine.jsonl" 2>"$out/engine.err" &
engine=$!
for _ in $(seq 600); do
  c=$(curl -s -H "Authorization: Bearer $token" localhost:8470/v1/status | python3 -c 'import json,sys; print(sum(len(g["receivers"]) for g in json.load(sys.stdin)["gpus"]))')
  [ "$c" = 1 ] && break
  sleep 0.2
done
PYTHONUNBUFFERED=1 python3 bench/rl_trainer.py --url http://127.0.0.1:8470 --token "$token" --layers "$layers" \
  --steps "$steps" --warmup "$warmup" ${CHANGING_EVERY:+--changing-every "$CHANGING_EVERY"} $([ "${BASE:-0}" = 1 ] && echo --base) \
  $([ "${SPARSE:-0}" = 1 ] && echo --sparse) $([ "${ATOMIC:-0}" = 1 ] && echo --atomic) \
  ${COMMITS:+--commits "$COMMITS"} | tee "$out/trainer.jsonl"
wait "$engine"
kill -TERM "$daemon"
wait "$daemon"
rm -rf "$st"

python3 - "$out" "$warmup" <<'PY'
import json, re, sys, pathlib, statistics as st
out, warmup = pathlib.Path(sys.argv[1]), int(sys.argv[2])
h2d = min(float(x) for x in re.findall(r"device \d+ .*?: ([\d.]+) GB/s", out.joinpath("floor.txt").read_text()))
lines = [json.loads(l) for l in out.joinpath("trainer.jsonl").read_text().splitlines() if l.startswith("{")]
get = lambda what: [l for l in lines if l["what"] == what]
nbytes = get("checkpoint")[0]["bytes"]
d2h = get("d2h_floor")[0]["gbps"]
f_h2d, f_d2h = nbytes / h2d / 1e9, nbytes / d2h / 1e9
print(f"checkpoint: {get('checkpoint')[0]['tensors']} tensors, {nbytes} bytes")
print(f"floors: H2D {h2d:.2f} GB/s -> {f_h2d:.3f} s; D2H {d2h:.2f} GB/s -> {f_d2h:.3f} s")
commits = get("commit")[1:]
if commits:
    c = st.median(x["seconds"] for x in commits)
    pin = st.median(x["timings"]["pinSeconds"] for x in commits)
    hsh = st.median(x["timings"]["hashSeconds"] for x in commits)
    print(f"staging commit (median of {len(commits)} after the first): {c:.3f} s (target 0.35); copy {pin:.3f} s "
          f"({nbytes / pin / 1e9:.1f} GB/s), hash {hsh:.3f} s ({nbytes / hsh / 1e9:.1f} GB/s)")
steps = [s for s in get("step") if not s["warmup"]]
bad = [s for s in get("step") if s["state"] != "succeeded"]
if steps:
    med = {k: st.median(s[k] for s in steps) for k in ("push", "update", "total")}
    print(f"RL steps ({len(steps)} after {warmup} warm-up): push {med['push']:.3f} s = {med['push'] / f_d2h:.2f} x D2H floor "
          f"(target 1.2); update {med['update']:.3f} s = {med['update'] / f_h2d:.2f} x H2D floor; total {med['total']:.3f} s = "
          f"{med['total'] / f_h2d:.2f} x H2D floor (target 2.3)")
    print("per step (push, update, total):", [(round(s["push"], 3), round(s["update"], 3), round(s["total"], 3)) for s in get("step")])
    print("per step, bytes the update moved and tensors it left out:", [(s.get("updateBytes"), (s.get("skipped") or {}).get("tensors")) for s in get("step")])
    sparse = [s for s in steps if s.get("delta")]
    if sparse:
        upd = st.median(s["update"] for s in sparse)
        moved = st.median(s["updateBytes"] / nbytes for s in sparse)
        print(f"sparse steps ({len(sparse)}): update {upd * 1000:.1f} ms = {upd / f_h2d:.3f} x the full update's H2D floor "
              f"(target 0.1); moved {moved * 100:.2f}% of the bytes (target 5%); deltas made in "
              f"{st.median(s['delta']['seconds'] for s in sparse):.3f} s after ready "
              f"({st.median(s['delta']['bytes'] for s in sparse) / 1e9:.2f} GB for "
              f"{st.median(s['delta']['tensors'] for s in sparse)} tensors; waited {st.median(s['deltaWait'] for s in sparse):.3f} s)")
        print("per sparse step (update ms, deltas {tensors, bytes, wholeBytes}):", [(round(s["update"] * 1000, 1), s["deltas"]) for s in sparse])
atomic = [s for s in steps if s.get("atomic")]
if atomic:
    print(f"atomic cutover ({len(atomic)} steps): stage {st.median(s['atomic']['stageSeconds'] for s in atomic) * 1000:.1f} ms, "
          f"commit {st.median(s['atomic']['commitSeconds'] for s in atomic) * 1000:.1f} ms, window per engine "
          f"{st.median(max(s['windowMs']) for s in atomic):.2f} ms (target 5), max {max(max(s['windowMs']) for s in atomic):.2f}")
for one in get("one_element"):
    print(f"one element changed: update {one['update'] * 1000:.2f} ms (target 5), {one['updateBytes']} bytes, state {one['state']}, deltas {one['deltas']}")
engine = [json.loads(l) for l in out.joinpath("engine.jsonl").read_text().splitlines() if l.startswith("{")]
print(f"failed updates: {len(bad)}; consumer: {sum(e['ok'] for e in engine)}/{len(engine)} updates bit-exact")
PY
