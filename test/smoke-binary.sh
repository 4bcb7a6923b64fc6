#!/usr/bin/env bash
# Starts dist/ckptd from a directory with no node_modules and checks that it answers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cp "$root/dist/ckptd" "$work/ckptd"
cd "$work"
[ ! -e node_modules ] && [ ! -e ../node_modules ] || { echo "smoke: node_modules visible from $work" >&2; exit 1; }
env -u CKPTD_LIB_DIR XDG_RUNTIME_DIR="$work" ./ckptd --port 0 --state-dir "$work/state" --upload-dir "$work/uploads" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  port=$(grep -o '"port":[0-9]*' "$work/log" | head -1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/log"; echo "smoke: binary exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "${port:-}" ] || { cat "$work/log"; echo "smoke: binary did not listen" >&2; exit 1; }
health=$(curl -fsS "http://127.0.0.1:$port/v1/healthz")
[ "$health" = '{"ok":true}' ] || { echo "smoke: healthz said $health" >&2; exit 1; }
token=$(cut -d: -f2 "$work/state/tokens")  # made at first start
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/status")" = 401 ] || { echo "smoke: status without a token was not 401" >&2; exit 1; }
curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/status"; echo
kill -TERM "$pid"; wait "$pid"
echo "smoke: dist/ckptd answered /v1/healthz from $work and stopped cleanly"
