#!/usr/bin/env bash
# Builds the data-plane library into cuda-lib/build/.
#   build.sh host       libckpt-host.so (gcc only)
#   build.sh cuda       libckpt-cuda.so and the GPU test program ckpt-gpu-test (needs nvcc)
#   build.sh test       host C tests (test_host, test_files, test_comm, test_ucx) under AddressSanitizer, run
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p build
CC=${CC:-gcc}
NVCC=${NVCC:-nvcc}
WARN=(-Wall -Wextra -Werror)
CFLAGS=("${WARN[@]}" -std=gnu11 -O2 -g -fPIC -fvisibility=hidden -Iinclude -Isrc)
# The host backend's sources: shared ones first, then host.c and the communicator layers on it.
HOST_SRC=(src/common.c src/guard.c src/files.c src/hash.c src/delta.c src/host.c src/host_net.c src/host_boot.c src/host_comm.c src/ucx.c)
LINK=(-shared -Wl,--version-script=libckpt.map -Wl,--no-undefined)

host() {
  "$CC" "${CFLAGS[@]}" "${HOST_SRC[@]}" "${LINK[@]}" \
    -ldl -lpthread -o build/libckpt-host.so
}

cuda() {
  local arch=(-gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90)
  "$CC" "${CFLAGS[@]}" -c src/common.c -o build/common.o
  "$CC" "${CFLAGS[@]}" -c src/guard.c -o build/guard.o
  "$CC" "${CFLAGS[@]}" -c src/files.c -o build/files.o
  "$CC" "${CFLAGS[@]}" -c src/hash.c -o build/hash.o
  "$CC" "${CFLAGS[@]}" -c src/delta.c -o build/delta.o
  "$CC" "${CFLAGS[@]}" -c src/ucx.c -o build/ucx.o
  "$NVCC" "${arch[@]}" -O2 -std=c++17 -Xcompiler "-fPIC,-fvisibility=hidden,$(IFS=,; echo "${WARN[*]}")" \
    -Iinclude -Isrc -c src/cuda.cu -o build/cuda.o
  "$NVCC" "${arch[@]}" -shared -cudart static build/common.o build/guard.o build/files.o build/hash.o build/delta.o build/ucx.o build/cuda.o \
    -Xlinker --version-script=libckpt.map -Xlinker --no-undefined -ldl -lpthread -o build/libckpt-cuda.so
  "$CC" "${WARN[@]}" -std=gnu11 -O2 -g -Iinclude test/gpu_test.c -Lbuild -lckpt-cuda \
    -Wl,-rpath,'$ORIGIN' -lpthread -o build/ckpt-gpu-test
}

test_host() {
  local asan=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
  "$CC" "${CFLAGS[@]}" "${asan[@]}" "${HOST_SRC[@]}" \
    -shared -Wl,--version-script=libckpt.map -ldl -lpthread -o build/libckpt-host-asan.so
  "$CC" "${WARN[@]}" -std=gnu11 -O1 -g "${asan[@]}" -Iinclude test/test_host.c -Lbuild -lckpt-host-asan \
    -Wl,-rpath,'$ORIGIN' -lpthread -o build/test-host
  "$CC" "${WARN[@]}" -std=gnu11 -O1 -g "${asan[@]}" -Iinclude test/test_files.c -Lbuild -lckpt-host-asan \
    -Wl,-rpath,'$ORIGIN' -lpthread -o build/test-files
  "$CC" "${WARN[@]}" -std=gnu11 -O1 -g "${asan[@]}" -Iinclude test/test_comm.c -Lbuild -lckpt-host-asan \
    -Wl,-rpath,'$ORIGIN' -lpthread -o build/test-comm
  "$CC" "${WARN[@]}" -std=gnu11 -O1 -g "${asan[@]}" -Iinclude test/test_ucx.c -Lbuild -lckpt-host-asan \
    -Wl,-rpath,'$ORIGIN' -lpthread -o build/test-ucx
  # Where UCX's headers are installed, src/ucx_abi.h must match them (compiled, not run).
  if [ -f /usr/include/ucp/api/ucp.h ]; then
    "$CC" "${WARN[@]}" -std=gnu11 -Iinclude -Isrc -fsyntax-only test/ucx_abi_check.c
  else
    echo "UCX headers absent: src/ucx_abi.h not compared with them"
  fi
  local rc=0
  ./build/test-host || rc=1
  ./build/test-files || rc=1
  ./build/test-comm || rc=1
  ./build/test-ucx || rc=1
  return "$rc"
}

case "${1:-host}" in
  host) host ;;
  cuda) cuda ;;
  test) test_host ;;
  *) echo "usage: build.sh host|cuda|test" >&2; exit 2 ;;
esac
