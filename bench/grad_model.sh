#!/usr/bin/env bash
# On the GPU machine: a daemon on the CUDA backend, bench/grad_model.py (a transformers model
# whose parameters require grad receives an update bit-exact) and bench/tp_model.py (the same
# kind of model cut for tensor parallel 2, two processes on the one GPU, through ckptd's vLLM
# weight transfer backend).
#   source .device/boot.sh; bash bench/grad_model.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
state=$(mktemp -d)
# 8 MiB buckets: the models span a dozen, so slots are reused within an update
node --import tsx daemon/main.ts --backend cuda --port 8479 --state-dir "$state" --bucket-bytes 8388608 >"$out/grad-daemon.log" 2>&1 &
pid=$!
for _ in $(seq 300); do curl -sf localhost:8479/v1/healthz >/dev/null && break; sleep 0.1; done
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/grad_model.py --url http://127.0.0.1:8479 --socket "$state/sockets/gpu-0.sock" --tokens "$state/tokens" \
  2>"$out/grad-model.err" | tee "$out/grad-model.json"
rc=${PIPESTATUS[0]}
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/tp_model.py --url http://127.0.0.1:8479 --socket-dir "$state/sockets" --tokens "$state/tokens" \
  2>"$out/tp-model.err" | tee "$out/tp-model.json"
tp=${PIPESTATUS[0]}
kill -TERM "$pid"; wait "$pid"
rm -rf "$state"
echo "grad_model rc=$rc tp_model rc=$tp"
[ "$rc" = 0 ] && [ "$tp" = 0 ]
