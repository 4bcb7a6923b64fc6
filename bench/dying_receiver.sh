#!/usr/bin/env bash
# On the GPU machine: an engine killed (SIGKILL) in the middle of an update. The update must
# fail within receiverTimeoutMs naming it, the daemon must keep serving, and the next update
# to a new engine must pass the SPEC check.   source .device/boot.sh; bash bench/dying_receiver.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=0
dir=/dev/shm/q8b8
python3 bench/make_q8b.py --layers 8 --dir "$dir" >/dev/null
state=$(mktemp -d)
node --import tsx daemon/main.ts --backend cuda --port 8470 --state-dir "$state" --receiver-timeout-ms 5000 >"$out/dying-daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 300); do curl -sf localhost:8470/v1/healthz >/dev/null && break; sleep 0.1; done
token=$(cut -d: -f2 "$state/tokens")  # the admin token the daemon made at its first start
curl -sf -H "Authorization: Bearer $token" -X POST localhost:8470/v1/checkpoints -H 'content-type: application/json' -d "{\"name\":\"q4\",\"dir\":\"$dir\"}" >/dev/null
engine=(python3 integrations/torch_engine.py --socket "$state/sockets/gpu-0.sock" --device cuda:0 --layers 8)
wait_receivers() { for _ in $(seq 300); do
  n=$(curl -s -H "Authorization: Bearer $token" localhost:8470/v1/status | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["gpus"][0]["receivers"]))')
  [ "$n" = "$1" ] && return; sleep 0.1; done; }

"${engine[@]}" --updates 100 >"$out/dying-engine1.jsonl" 2>&1 &
victim=$!
wait_receivers 1
t0=$(date +%s.%N)  # the update takes about 0.15 s; the engine dies 0.03 s into it
curl -s -H "Authorization: Bearer $token" -X POST localhost:8470/v1/updates -H 'content-type: application/json' -d '{"checkpoint":"q4","wait":false}' >/dev/null
sleep 0.03
kill -9 "$victim"
wait "$victim" 2>/dev/null
while curl -s -H "Authorization: Bearer $token" localhost:8470/v1/updates/u-1 | grep -q '"state":"running"'; do sleep 0.01; done
t1=$(date +%s.%N)
echo "killed engine: $(curl -s -H "Authorization: Bearer $token" localhost:8470/v1/updates/u-1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["state"], "-", r.get("error", {}).get("message"), "-", [(x["name"], x["state"]) for x in r["receivers"]])')"
echo "update ended $(python3 -c "print(round($t1 - $t0, 3))") s after it started; healthz: $(curl -s localhost:8470/v1/healthz)"

"${engine[@]}" --updates 1 >"$out/dying-engine2.jsonl" 2>&1 &
second=$!
wait_receivers 1
echo "next update: $(curl -s -H "Authorization: Bearer $token" -X POST localhost:8470/v1/updates -H 'content-type: application/json' -d '{"checkpoint":"q4"}' | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("state"), r.get("timings", {}).get("seconds"))')"
wait "$second"; echo "new engine's check: $(cat "$out/dying-engine2.jsonl" | grep '^{' | python3 -c 'import json,sys; print([json.loads(l)["ok"] for l in sys.stdin])')"
kill -TERM "$daemon"; wait "$daemon"; echo "daemon exit $?"
