"""End-to-end time of a 1 MiB update: from POST /v1/updates to its answer, with a receiver
per GPU applying into preallocated tensors. Usage (daemon on :8470, state dir given):

    python3 bench/tiny_update.py --state STATE_DIR --gpus N [--runs 20]

Prints one JSON line: median / min / max milliseconds over the runs after a warm-up, and
whether every run delivered the registered bytes (checked on GPU 0 against the source).
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integrations"))
from ckptd_receiver import Receiver, apply_to_params  # noqa: E402
from trainer_push import push_shm  # noqa: E402

URL = "http://127.0.0.1:8470"


def post(path, body):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req) as res:
        return json.load(res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(7)
    source = {"tiny.weight": torch.randn(512, 1024, generator=g).to(torch.bfloat16)}  # 1 MiB
    push_shm(URL, "tiny", source)
    received = []

    def engine(gpu):
        dev = torch.device(f"cuda:{gpu}")
        params = {k: torch.empty_like(v, device=dev) for k, v in source.items()}
        r = Receiver(os.path.join(args.state, "sockets", f"gpu-{gpu}.sock"), device=dev, name=f"tiny-{gpu}")
        for _ in range(args.runs + 1):
            r.receive(apply_to_params(params))
            if gpu == 0:
                received.append(bool(torch.equal(params["tiny.weight"].cpu(), source["tiny.weight"])))
        r.close()

    threads = [threading.Thread(target=engine, args=(i,), daemon=True) for i in range(args.gpus)]
    for t in threads:
        t.start()
    while True:
        status = json.load(urllib.request.urlopen(URL + "/v1/status"))
        if sum(len(x["receivers"]) for x in status["gpus"]) >= args.gpus:
            break
        time.sleep(0.05)
    times = []
    for _ in range(args.runs + 1):
        t0 = time.perf_counter()
        r = post("/v1/updates", {"checkpoint": "tiny"})
        times.append((time.perf_counter() - t0) * 1000)
        assert r["state"] == "succeeded", r
    for t in threads:
        t.join(30)
    times = sorted(times[1:])
    print(json.dumps({"bytes": 1 << 20, "runs": args.runs, "median_ms": statistics.median(times),
                      "min_ms": times[0], "max_ms": times[-1], "bit_exact": all(received) and len(received) > 0}))


if __name__ == "__main__":
    main()
