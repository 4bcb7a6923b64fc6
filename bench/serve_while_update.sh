#!/usr/bin/env bash
# Serving while updating (issue 14), on the GPU machine:
#   source .device/boot.sh; bash bench/serve_while_update.sh [layers] [updates]
# with cuda-lib/build carried. A serving-like load (bench/serve_load.py: forward passes of a
# ~1.3B Qwen3, 16 x 256 tokens, back to back) runs on GPU 0 beside the SPEC consumer
# (integrations/torch_engine.py, staging allowed), while the daemon runs whole updates of q8b:
# first direct ones, then atomic ones (staged, then committed). Reports the load's step times
# (p50, p99) when idle, during direct updates, and during atomic staging and commits; the
# target is a p99 rise under 10% while staging. PACE=G: atomic updates stage at G GB/s
# (paceGBps), then as many again unpaced.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
layers=${1:-36}
n=${2:-4}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
dir=/dev/shm/q8b
[ -f "$dir/q8b.json" ] || python3 bench/make_q8b.py --layers "$layers" --dir "$dir" >"$out/q8b.json"
updates=$((2 * n)); [ "${PACE:-0}" != 0 ] && updates=$((3 * n))
st=$(mktemp -d)
node --import tsx daemon/main.ts --backend cuda --port 8470 --state-dir "$st" --log-level warn >"$out/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 300); do curl -sf localhost:8470/v1/healthz >/dev/null && break; sleep 0.1; done
token=$(cut -d: -f2 "$st/tokens")
curl -sf -H "Authorization: Bearer $token" -X POST localhost:8470/v1/checkpoints -H 'content-type: application/json' \
  -d "{\"name\":\"q8b\",\"dir\":\"$dir\"}" >"$out/register.json" || { cat "$out/daemon.log"; exit 1; }
PYTHONUNBUFFERED=1 python3 integrations/torch_engine.py --socket "$st/sockets/gpu-0.sock" --device cuda:0 \
  --layers "$layers" --updates "$updates" --stage-bytes $((24 << 30)) >"$out/engine.jsonl" 2>"$out/engine.err" &
engine=$!
for _ in $(seq 600); do
  c=$(curl -s -H "Authorization: Bearer $token" localhost:8470/v1/status | python3 -c 'import json,sys; print(sum(len(g["receivers"]) for g in json.load(sys.stdin)["gpus"]))')
  [ "$c" = 1 ] && break
  sleep 0.2
done
PYTHONUNBUFFERED=1 python3 bench/serve_load.py --out "$out/steps.jsonl" --seconds 900 >"$out/load.err" 2>&1 &
load=$!
python3 - "$out" "$token" "$n" "${PACE:-0}" <<'PY'
import json, sys, time, urllib.request, pathlib
out, token, n, pace = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def steps():
    p = out / "steps.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()[1:]] if p.exists() else []
while len(steps()) < 50:
    time.sleep(0.5)
idle = time.time()
time.sleep(5)
with open(out / "updates.jsonl", "w") as f:
    f.write(json.dumps({"idle": [idle, time.time()]}) + "\n")
    runs = [("direct", 0)] * n + [("atomic", 0)] * n + ([("atomic", pace)] * n if pace > 0 else [])
    for cutover, paced in runs:
        body = json.dumps({"checkpoint": "q8b", "cutover": cutover, **({"paceGBps": paced} if paced else {})}).encode()
        req = urllib.request.Request("http://127.0.0.1:8470/v1/updates", data=body, method="POST",
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
        t0 = time.time()
        with urllib.request.urlopen(req) as res:
            r = json.load(res)
        t1 = time.time()
        f.write(json.dumps({"cutover": cutover, "pace": paced, "t0": t0, "t1": t1, "state": r.get("state"), "atomic": r.get("atomic"),
                            "windowMs": [x.get("windowMs") for x in r.get("receivers", [])]}) + "\n")
        f.flush()
        time.sleep(4)  # the consumer checks (and refills) between updates: not in any window
PY
kill "$load"; wait "$load" 2>/dev/null
wait "$engine"
kill -TERM "$daemon"; wait "$daemon"
rm -rf "$st"
python3 - "$out" <<'PY'
import json, sys, pathlib, statistics as st
out = pathlib.Path(sys.argv[1])
lines = out.joinpath("steps.jsonl").read_text().splitlines()
params = json.loads(lines[0])["params"]
steps = [json.loads(l) for l in lines[1:]]
ups = [json.loads(l) for l in out.joinpath("updates.jsonl").read_text().splitlines()]
idle = ups[0]["idle"]
def within(a, b):
    return [(s["t1"] - s["t0"]) * 1000 for s in steps if s["t0"] < b and s["t1"] > a]
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
base = within(*idle)
rows = {"idle": base}
rows["direct update"] = [x for u in ups[1:] if u.get("cutover") == "direct" for x in within(u["t0"], u["t1"])]
atomic = [u for u in ups[1:] if u.get("cutover") == "atomic" and u.get("atomic")]
for pace in sorted({u.get("pace", 0) for u in atomic}):
    mine = [u for u in atomic if u.get("pace", 0) == pace]
    what = f"at {pace} GB/s" if pace else "unpaced"
    rows[f"atomic staging {what}"] = [x for u in mine for x in within(u["t0"], u["t0"] + u["atomic"]["stageSeconds"])]
    rows[f"atomic commit {what}"] = [x for u in mine for x in within(u["t0"] + u["atomic"]["stageSeconds"], u["t1"])]
p50, p99 = pct(base, 0.5), pct(base, 0.99)
print(f"serving load: {params / 1e9:.2f}B parameters, 16 x 256 tokens per step")
for name, xs in rows.items():
    print(f"{name:>30}: {len(xs):4d} steps, p50 {pct(xs, 0.5):6.1f} ms ({pct(xs, 0.5) / p50 - 1:+.0%}), "
          f"p99 {pct(xs, 0.99):6.1f} ms ({pct(xs, 0.99) / p99 - 1:+.0%})")
for c in ("direct", "atomic"):
    us = [u for u in ups[1:] if u.get("cutover") == c]
    print(f"{c} updates: {[(round(u['t1'] - u['t0'], 3), u.get('pace', 0)) for u in us]} (s, pace), states {[u['state'] for u in us]}")
if atomic:
    print("atomic stage / commit (s) and window (ms):", [(round(u["atomic"]["stageSeconds"], 3), round(u["atomic"]["commitSeconds"], 3), u["windowMs"]) for u in atomic])
engine = [json.loads(l) for l in out.joinpath("engine.jsonl").read_text().splitlines() if l.startswith("{")]
print(f"consumer: {sum(e['ok'] for e in engine)}/{len(engine)} updates bit-exact")
PY
