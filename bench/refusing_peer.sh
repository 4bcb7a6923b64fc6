#!/usr/bin/env bash
# On the GPU machine: a peer that describes itself like the coordinator (one GPU, holding the
# checkpoint) but refuses every plan, so the coordinator starts joining an NCCL communicator
# that the peer never joins. Each update must fail within receiverTimeoutMs naming the peer,
# and the daemon must keep serving (no update left running).
#   source .device/boot.sh; bash bench/refusing_peer.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=0
dir=${DIR:-/dev/shm/q8b8}  # DIR=<checkpoint dir> BACKEND=host: the same flow without a GPU
ls "$dir"/*.safetensors >/dev/null 2>&1 || python3 bench/make_q8b.py --layers 8 --dir "$dir" >/dev/null
python3 - 8479 http://127.0.0.1:8470 >"$out/refusing-peer.log" 2>&1 <<'PY' &
import http.server, json, sys, urllib.request
coordinator = sys.argv[2]
class Peer(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):  # /v1/peer/info: the coordinator's own geometry, and "I hold it"
        # Passed on with the coordinator's signature, which that daemon has not seen yet.
        signed = {k: self.headers[k] for k in ("x-ckptd-timestamp", "x-ckptd-signature", "x-ckptd-body-sha256") if self.headers[k]}
        info = json.load(urllib.request.urlopen(urllib.request.Request(coordinator + self.path, headers=signed)))
        info.pop("running", None)  # the coordinator is busy with this very update; the fake is idle
        self.answer(200, dict(info, nodeId="refuser", holds="q4@1"))
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.answer(409, {"error": {"code": "update_running", "message": "refusing every plan"}})
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Peer).serve_forever()
PY
peer=$!
state=$(mktemp -d)
node --import tsx daemon/main.ts --backend ${BACKEND:-cuda} --port 8470 --state-dir "$state" --receiver-timeout-ms 2000 \
  --peers http://127.0.0.1:8479 >"$out/refusing-daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 300); do curl -sf localhost:8470/v1/healthz >/dev/null && break; sleep 0.1; done
token=$(cut -d: -f2 "$state/tokens")  # the admin token the daemon made at its first start
curl -sf -H "Authorization: Bearer $token" -X POST localhost:8470/v1/checkpoints -H 'content-type: application/json' -d "{\"name\":\"q4\",\"dir\":\"$dir\"}" >/dev/null
for i in 1 2; do
  t0=$(date +%s.%N)
  r=$(curl -s -H "Authorization: Bearer $token" -X POST localhost:8470/v1/updates -H 'content-type: application/json' -d '{"checkpoint":"q4"}')
  t1=$(date +%s.%N)
  echo "update $i: $(echo "$r" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("error", {}).get("message"))') after $(python3 -c "print(round($t1 - $t0, 3))") s"
done
echo "healthz: $(curl -s localhost:8470/v1/healthz)"
kill -TERM "$daemon"; wait "$daemon"; echo "daemon exit $?"
kill "$peer"
