#!/usr/bin/env bash
# Registration of the standard checkpoint (../shared/bench/SPEC.md) on the GPU machine:
#   source .device/boot.sh; bash bench/register.sh [layers]
# with cuda-lib/build carried (bash cuda-lib/build.sh cuda; nvcc -O2 -o
# cuda-lib/build/register_floor bench/register_floor.c). Prints the floor (plain mmap +
# cudaHostRegister of the same files), then the daemon's in-place registration (pin and hash
# seconds, GB/s) and its copy mode, median of 3 after a warm-up, each checked against the
# index (every tensor present, hashes equal across runs).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
layers=${1:-36}
dir=/dev/shm/q8b
python3 bench/make_q8b.py --layers "$layers" --dir "$dir" | tee "$out/q8b.json"
files=$(ls "$dir"/*.safetensors)
for i in 1 2 3; do ./cuda-lib/build/register_floor $files; done | tee "$out/floor.jsonl"

state=$(mktemp -d)
node --import tsx daemon/main.ts --backend cuda --port 8470 --state-dir "$state" --log-level warn >"$out/daemon.log" 2>&1 &
pid=$!
port=""
for _ in $(seq 300); do
  port=$(curl -s "http://127.0.0.1:8470/v1/healthz" >/dev/null 2>&1 && echo 8470)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { cat "$out/daemon.log"; exit 1; }
token=$(cut -d: -f2 "$state/tokens")  # the admin token the daemon made at its first start
api="http://127.0.0.1:$port/v1"
: >"$out/register.jsonl"
for mode in inplace copy; do
  copy=false; [ $mode = copy ] && copy=true
  for i in 0 1 2 3; do
    curl -s -H "Authorization: Bearer $token" -o "$out/reg.json" -w '%{time_total}' -X POST "$api/checkpoints" -H 'content-type: application/json' \
      -d "{\"name\":\"q8b-$mode\",\"dir\":\"$dir\",\"copy\":$copy}" >"$out/wall.txt"
    python3 - "$out" "$mode" "$i" <<'PY' >>"$out/register.jsonl"
import json, sys, pathlib
out, mode, i = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
r = json.loads(out.joinpath("reg.json").read_text())
print(json.dumps({"mode": mode, "run": i, "state": r.get("state"), "bytes": r.get("bytes"), "tensors": r.get("tensorCount"),
                  "wall": float(out.joinpath("wall.txt").read_text()), **r.get("timings", {}), "error": r.get("error")}))
PY
    curl -s -H "Authorization: Bearer $token" "$api/checkpoints/q8b-$mode@$((i + 1))" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(json.dumps({t["name"]: t["hash"] for t in m["tensors"]}))' >"$out/hashes-$mode-$i.json"
    curl -s -H "Authorization: Bearer $token" -o /dev/null -X DELETE "$api/checkpoints/q8b-$mode@$((i + 1))"
  done
done
kill -TERM "$pid"; wait "$pid"
python3 - "$out" <<'PY'
import json, sys, pathlib, statistics as st
out = pathlib.Path(sys.argv[1])
floor = [json.loads(l) for l in out.joinpath("floor.jsonl").read_text().splitlines() if l.strip()][1:]
runs = [json.loads(l) for l in out.joinpath("register.jsonl").read_text().splitlines()]
q = json.loads(out.joinpath("q8b.json").read_text().strip().splitlines()[-1])
hashes = {p.name: p.read_text() for p in out.glob("hashes-*.json")}
same = len(set(hashes.values())) == 1
f_map = st.median(r["map_seconds"] for r in floor); f_reg = st.median(r["register_seconds"] for r in floor)
B = q["bytes"]
print(f"checkpoint: {q['tensors']} tensors, {B} bytes; hashes identical over {len(hashes)} registrations: {same}")
print(f"floor (mmap + cudaHostRegister): map {f_map:.3f} s + register {f_reg:.3f} s = {f_map + f_reg:.3f} s, {B / (f_map + f_reg) / 1e9:.1f} GB/s")
for mode in ("inplace", "copy"):
    rs = [r for r in runs if r["mode"] == mode and r["run"] > 0]
    bad = [r for r in rs if r["state"] != "ready" or r["tensors"] != q["tensors"]]
    pin = st.median(r["pinSeconds"] for r in rs if "pinSeconds" in r) if not bad else float("nan")
    hsh = st.median(r["hashSeconds"] for r in rs if "hashSeconds" in r) if not bad else float("nan")
    wall = st.median(r["wall"] for r in rs)
    print(f"{mode:<8} pin {pin:.3f} s ({B / pin / 1e9:.1f} GB/s, {pin / (f_map + f_reg):.2f}x floor)  hash {hsh:.3f} s ({B / hsh / 1e9:.1f} GB/s)  API wall {wall:.3f} s  failures {len(bad)}")
    print(f"{mode:<8} API wall {wall:.3f} s = {wall / f_reg:.2f}x the register-only floor ({f_reg:.3f} s, pages already mapped; target 1.2 in place), {B / wall / 1e9:.1f} GB/s")
PY
