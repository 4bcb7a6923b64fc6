#!/usr/bin/env bash
# After a change to the data path or the engine side, on the GPU machine:
#   source .device/boot.sh; bash bench/gpu-check.sh
# with cuda-lib/build carried. The GPU test program, the engine side's unit tests under the
# machine's torch, bench/update.sh on one GPU (ratio to the floor, bit-exact consumer) and
# bench/grad_model.sh; prints a summary and leaves every log in $OUT/gpu-check.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
res=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  ./cuda-lib/build/ckpt-gpu-test >"$res/gpu-test.log" 2>&1; echo "gpu-test rc=$?: $(tail -1 "$res/gpu-test.log")"
  REQUIRE_TORCH=1 bash integrations/run-tests.sh >"$res/python.log" 2>&1; echo "python tests rc=$?: $(grep -E '^(Ran|OK|FAILED)' "$res/python.log" | paste -sd' ')"
  OUT=$res/update GPUS=1 bash bench/update.sh 36 5 >"$res/update.log" 2>&1; echo "update rc=$?"
  tail -9 "$res/update.log"
  OUT=$res/grad bash bench/grad_model.sh >"$res/grad.log" 2>&1; echo "grad_model.sh rc=$?"
  tail -3 "$res/grad.log"
} | tee "$res/summary.txt"
tar -czf "${OUT:-/tmp}/gpu-check.tgz" -C "$res" .
rm -rf "$res"
