#!/usr/bin/env bash
# The pull figures of issue 12 on the GPU machine, in one run:
#   source .device/boot.sh; bash bench/gpu-pull.sh
# with cuda-lib/build and .ucx carried (.ucx: Debian's libucx0, libnuma1, iperf3, libiperf0 and
# libsctp1 unpacked with dpkg -x, since that machine has neither UCX nor iperf3). Runs
# bench/pull.ts (4 GB between host-backend daemons, against iperf3) and bench/join.sh (a join
# with pull: true into the SPEC consumer on GPU 0, against the H2D floor), with UCX's tcp and
# with the transports UCX chooses; leaves every log in $OUT/gpu-pull.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
ucx=$PWD/.ucx/usr/lib/x86_64-linux-gnu
export PATH=$PWD/.ucx/usr/bin:$PATH LD_LIBRARY_PATH=$ucx
res=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; git log -1 --format=%h 2>/dev/null
  node --import tsx bench/pull.ts --gb 4 --transports tcp --ucx-path "$ucx/libucp.so.0" >"$res/pull-tcp.log" 2>&1; echo "pull.ts tcp rc=$?"
  tail -6 "$res/pull-tcp.log"
  OUT=$res/join-tcp UCX_LIB=$ucx UCX_TRANSPORTS=tcp bash bench/join.sh 36 2 >"$res/join-tcp.log" 2>&1; echo "join.sh tcp rc=$?"
  tail -4 "$res/join-tcp.log"
  OUT=$res/join-any UCX_LIB=$ucx UCX_TRANSPORTS= bash bench/join.sh 36 2 >"$res/join-any.log" 2>&1; echo "join.sh any rc=$?"
  tail -4 "$res/join-any.log"
} | tee "$res/summary.txt"
tar -czf "${OUT:-/tmp}/gpu-pull.tgz" -C "$res" .
rm -rf "$res"
