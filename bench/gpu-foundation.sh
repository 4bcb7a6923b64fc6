#!/usr/bin/env bash
# The foundation's run on the GPU machine (see ../shared/device/README.md):
#   source .device/boot.sh; bash bench/gpu-foundation.sh
# with cuda-lib/build carried (built here by `bash cuda-lib/build.sh cuda`). Runs the GPU
# test program, a daemon smoke test on the CUDA backend, and host-to-device bandwidth
# through the C library, through the daemon's ffi and through torch, in one run.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$out/device.txt"

echo "== GPU test program"
./cuda-lib/build/ckpt-gpu-test 2>&1 | tee "$out/gpu-test.log"
gpu_rc=${PIPESTATUS[0]}

echo "== daemon on the CUDA backend"
state=$(mktemp -d)
node --import tsx daemon/main.ts --backend cuda --port 0 --state-dir "$state" >"$out/daemon.log" 2>&1 &
pid=$!
port=""
for _ in $(seq 200); do
  port=$(grep -o '"port":[0-9]*' "$out/daemon.log" | head -1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  sleep 0.1
done
if [ -n "$port" ]; then
  curl -fsS "http://127.0.0.1:$port/v1/healthz" | tee "$out/healthz.json"; echo
  token=$(cut -d: -f2 "$state/tokens")  # the admin token the daemon made at its first start
  curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/status" | tee "$out/status.json"; echo
fi
kill -TERM "$pid"; wait "$pid"; daemon_rc=$?
echo "daemon exit: $daemon_rc"; tail -3 "$out/daemon.log"

echo "== host-to-device bandwidth, 4 GiB"
./cuda-lib/build/ckpt-gpu-test --bandwidth 4 2>&1 | tee "$out/bw-c.log"
node --import tsx bench/h2d.ts --gib 4 2>&1 | tee "$out/bw-ffi.json"
python3 bench/torch_h2d.py 4 2>&1 | tee "$out/bw-torch.json"
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
ffi = json.loads(out.joinpath("bw-ffi.json").read_text().strip().splitlines()[-1])
torch = json.loads(out.joinpath("bw-torch.json").read_text().strip().splitlines()[-1])
print(f"{'path':<18}{'bytes':>14}{'median s':>10}{'GB/s':>8}{'#wrong':>8}")
for r in (ffi, torch):
    print(f"{r['what']:<18}{r['bytes']:>14}{r['seconds']:>10.4f}{r['gbps']:>8.2f}{r['wrong']:>8}")
print(f"ffi / torch: {ffi['gbps'] / torch['gbps']:.3f}")
PY
echo "gpu-test rc=$gpu_rc daemon rc=$daemon_rc"
