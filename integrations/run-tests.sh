#!/usr/bin/env bash
# The engine side's unit tests, run by a python that has torch where this host has one, so the
# torch cases run rather than skip: $TORCH_PYTHON if set, else python3, else /usr/bin/python3
# (Debian's python3-torch serves only the system python). With REQUIRE_TORCH=1 (CI), no
# python with torch is an error, and so is any torch case that cannot run.
#   bash integrations/run-tests.sh [-v]
set -euo pipefail
cd "$(dirname "$0")/.."

py=""
for candidate in ${TORCH_PYTHON:-python3 /usr/bin/python3}; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  if [ "${REQUIRE_TORCH:-}" = 1 ]; then
    echo "integrations/run-tests.sh: REQUIRE_TORCH=1, but no python here imports torch" >&2
    exit 1
  fi
  py=python3
fi
echo "integrations: $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
exec "$py" -m unittest discover -s integrations/tests -t . "$@"
