#!/usr/bin/env bash
# A P2P join on the GPU machine (issue 12), with the standard checkpoint (../shared/bench/SPEC.md):
#   source .device/boot.sh; UCX_LIB=<dir of libucp.so.0> bash bench/join.sh [layers] [joins]
# with cuda-lib/build carried. One daemon on the host backend holds q8b (no GPU work: it
# serves from its pinned memory over UCX); a second daemon (CUDA) lacks it and gets
# POST /v1/updates {"checkpoint":"q8b","pull":true}: it pulls the version from the first and
# gives each bucket to the SPEC consumer on GPU 0 as soon as its bytes are verified. Reports each
# join's time from the API next to the host-to-device floor of the whole checkpoint measured in
# the same run; the consumer checks every update bit for bit. Between joins the pulled version
# is deleted, so each join pulls (and pins) afresh. UCX_TRANSPORTS picks UCX's transports
# (default tcp; "" lets UCX choose, shared memory included); UCX_LANES the lanes of each daemon (4).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
layers=${1:-36}
n=${2:-2}
ucx=${UCX_LIB:?set UCX_LIB to the directory of libucp.so.0}
export LD_LIBRARY_PATH=$ucx${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
tls=${UCX_TRANSPORTS-tcp}
export CUDA_VISIBLE_DEVICES=0
dir=/dev/shm/q8b

if [ -f "$dir/q8b.json" ]; then cp "$dir/q8b.json" "$out/q8b.json"; else
  python3 bench/make_q8b.py --layers "$layers" --dir "$dir" | tee "$out/q8b.json"
  cp "$out/q8b.json" "$dir/q8b.json"
fi
./cuda-lib/build/ckpt-gpu-test --bandwidth 4 | tee "$out/floor.txt"

secret=$(mktemp)
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$secret"
src=$(mktemp -d) joiner=$(mktemp -d)
common=(--cluster-secret-file "$secret" --ucx-path "$ucx/libucp.so.0" --ucx-transports "$tls" --ucx-lanes "${UCX_LANES:-4}"
  --heartbeat-ms 200 --log-level info)
node --import tsx daemon/main.ts --backend host --port 8480 --state-dir "$src" "${common[@]}" >"$out/source.log" 2>&1 &
spid=$!
node --import tsx daemon/main.ts --backend cuda --port 8481 --state-dir "$joiner" --peers http://127.0.0.1:8480 \
  "${common[@]}" >"$out/joiner.log" 2>&1 &
jpid=$!
for p in 8480 8481; do for _ in $(seq 300); do curl -sf localhost:$p/v1/healthz >/dev/null && break; sleep 0.1; done; done
ts=$(cut -d: -f2 "$src/tokens") tj=$(cut -d: -f2 "$joiner/tokens")
# api TOKEN PORT PATH [curl flags]: the answer, then the request's time on a line of its own
api() { local tok=$1 port=$2 path=$3; shift 3; curl -s -H "Authorization: Bearer $tok" -H 'content-type: application/json' "$@" -w '\n%{time_total}\n' "localhost:$port$path"; }
api "$ts" 8480 /v1/checkpoints -X POST -d "{\"name\":\"q8b\",\"dir\":\"$dir\"}" >"$out/register.txt"

CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 python3 integrations/torch_engine.py --socket "$joiner/sockets/gpu-0.sock" \
  --device cuda:0 --layers "$layers" --updates "$n" >"$out/engine.jsonl" 2>"$out/engine.err" &
epid=$!
for _ in $(seq 600); do
  c=$(curl -s -H "Authorization: Bearer $tj" localhost:8481/v1/status | python3 -c 'import json,sys; print(sum(len(g["receivers"]) for g in json.load(sys.stdin)["gpus"]))' 2>/dev/null)
  up=$(curl -s -H "Authorization: Bearer $tj" localhost:8481/v1/peers | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin)["peers"] if p["state"] == "up" and p["versions"]))' 2>/dev/null)
  [ "$c" = 1 ] && [ "$up" = 1 ] && break
  sleep 0.2
done

: >"$out/joins.jsonl"
for i in $(seq 1 "$n"); do
  api "$tj" 8481 /v1/updates -X POST -d '{"checkpoint":"q8b","pull":true}' --max-time 120 >"$out/join-$i.txt"
  api "$tj" 8481 /v1/checkpoints/q8b >"$out/pulled-$i.txt"
  python3 - "$out/join-$i.txt" "$out/pulled-$i.txt" "$i" >>"$out/joins.jsonl" <<'PY'
import json, sys
body, wall = open(sys.argv[1]).read().strip().rsplit("\n", 1)
r = json.loads(body)
v = json.loads(open(sys.argv[2]).read().strip().rsplit("\n", 1)[0])
pull = v.get("progress", {}).get("pull", {})
print(json.dumps({"join": int(sys.argv[3]), "wall": float(wall), "state": r.get("state"), "error": r.get("error"),
                  "update": r.get("timings"), "pull": {k: pull.get(k) for k in ("gbps", "seconds", "mismatches")}}))
PY
  id=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().rsplit("\n",1)[0]).get("id",""))' "$out/pulled-$i.txt")
  api "$tj" 8481 "/v1/checkpoints/$id" -X DELETE >/dev/null
done
# The consumer stops after n updates; one that never got them is stopped here.
for _ in $(seq 100); do kill -0 "$epid" 2>/dev/null || break; sleep 0.1; done
kill "$epid" 2>/dev/null; wait "$epid"
grep -E '"pulled|UCX ready|pull source' "$out/joiner.log" "$out/source.log" | tail -5 >"$out/ucx-lines.txt"
kill -TERM "$spid" "$jpid"; wait "$spid" "$jpid"
rm -rf "$secret" "$src" "$joiner"

python3 - "$out" "$tls" "${UCX_LANES:-4}" <<'PY'
import json, re, sys, pathlib
out = pathlib.Path(sys.argv[1])
floor_txt = out.joinpath("floor.txt").read_text()
bw = min(float(x) for x in re.findall(r"device \d+ .*?: ([\d.]+) GB/s", floor_txt))
q = json.loads(out.joinpath("q8b.json").read_text().strip().splitlines()[-1])
floor = q["bytes"] / (bw * 1e9)
joins = [json.loads(l) for l in out.joinpath("joins.jsonl").read_text().splitlines()]
checks = [json.loads(l) for l in out.joinpath("engine.jsonl").read_text().splitlines() if l.startswith("{")]
print(f"join over UCX ({sys.argv[2] or 'UCX chooses'}, {sys.argv[3]} lanes): q8b {q['tensors']} tensors, {q['bytes']} bytes, one H2D floor {bw:.2f} GB/s -> {floor:.3f} s")
for j in joins:
    ratio = j["wall"] / floor
    p = j["pull"]
    print(f"join {j['join']}: {j['state']} in {j['wall']:.3f} s (API wall) = {ratio:.2f} x floor; pull {p['gbps'] or 0:.2f} GB/s over {p['seconds'] or 0:.2f} s, mismatches {p['mismatches']}"
          + (f"; error {j['error']}" if j.get("error") else ""))
print(f"consumer: {sum(c['ok'] for c in checks)}/{len(checks)} updates bit-exact")
PY
