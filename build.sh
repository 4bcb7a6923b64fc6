#!/usr/bin/env bash
# Builds the data-plane libraries and the single binary dist/ckptd.
#   bash build.sh           libraries (CUDA too where nvcc is present) and dist/ckptd
#   bash build.sh libs      libraries only
# dist/ckptd is a Node single-executable application embedding the bundled daemon, koffi's
# native module and the libraries; with DENORT_BIN set it is built by `deno compile` instead.
set -euo pipefail
cd "$(dirname "$0")"

bash cuda-lib/build.sh host
if command -v "${NVCC:-nvcc}" >/dev/null; then
  bash cuda-lib/build.sh cuda
else
  echo "build.sh: nvcc not found; building without the CUDA backend" >&2
fi
[ "${1:-}" = libs ] && exit 0

mkdir -p dist
if [ -n "${DENORT_BIN:-}" ]; then
  # dlopen needs real files, so this binary loads libckpt from --lib-dir / CKPTD_LIB_DIR:
  # ship cuda-lib/build/libckpt-*.so beside it (copied to dist/ here).
  cp cuda-lib/build/libckpt-*.so dist/
  DENORT_BIN="$DENORT_BIN" node_modules/deno/deno compile --allow-all --output dist/ckptd daemon/main.ts
  exit 0
fi

# Node single-executable application.
koffi_node=node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node
node_modules/.bin/esbuild daemon/sea/entry.ts --bundle --platform=node --target=node20 --format=cjs \
  --outfile=dist/ckptd.cjs --alias:koffi=./daemon/sea/koffi.cjs --external:cbor-extract \
  --banner:js='process.env.CBOR_NATIVE_ACCELERATION_DISABLED="true";const __ckptdMetaUrl=require("node:url").pathToFileURL(__filename).href;' \
  --define:import.meta.url=__ckptdMetaUrl --log-level=warning
assets="\"koffi.node\": \"$koffi_node\", \"libckpt-host.so\": \"cuda-lib/build/libckpt-host.so\""
[ -f cuda-lib/build/libckpt-cuda.so ] && assets+=", \"libckpt-cuda.so\": \"cuda-lib/build/libckpt-cuda.so\""
cat > dist/sea-config.json <<JSON
{ "main": "dist/ckptd.cjs", "output": "dist/ckptd.blob", "disableExperimentalSEAWarning": true,
  "useCodeCache": false, "useSnapshot": false, "assets": { $assets } }
JSON
node --experimental-sea-config dist/sea-config.json
cp "$(command -v node)" dist/ckptd
chmod u+w dist/ckptd
node_modules/.bin/postject dist/ckptd NODE_SEA_BLOB dist/ckptd.blob \
  --sentinel-fuse NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2 >/dev/null
rm -f dist/ckptd.blob dist/sea-config.json
echo "built dist/ckptd ($(du -h dist/ckptd | cut -f1))"
