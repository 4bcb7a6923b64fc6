"""End-to-end time of a 1 MiB update: from POST /v1/updates to its answer, with a receiver
per GPU applying into preallocated tensors. Usage (daemon on :8470, state dir given):

    python3 bench/tiny_update.py --state STATE_DIR --gpus N [--runs 20]

With several daemons (--state S0,S1,...: daemon i on port 8470+i owning GPUs i*N..i*N+N-1,
daemon 0 coordinating the others as its peers), every daemon holds the checkpoint.

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
from trainer_push import push_shm, token_from  # noqa: E402

URL = "http://127.0.0.1:8470"


def url(daemon):
    return f"http://127.0.0.1:{8470 + daemon}"


TOKENS = {}  # daemon -> its admin token, from <state dir>/tokens


def get(daemon, path):
    req = urllib.request.Request(url(daemon) + path, headers={"authorization": f"Bearer {TOKENS[daemon]}"})
    with urllib.request.urlopen(req) as res:
        return json.load(res)


def post(path, body):
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKENS[0]}"}
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), headers)
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
    states = args.state.split(",")
    for d in range(len(states)):
        TOKENS[d] = token_from(os.path.join(states[d], "tokens"))
        push_shm(url(d), "tiny", source, token=TOKENS[d])
    received = {}

    def engine(d, gpu):
        dev = torch.device(f"cuda:{d * args.gpus + gpu}")
        params = {k: torch.empty_like(v, device=dev) for k, v in source.items()}
        r = Receiver(os.path.join(states[d], "sockets", f"gpu-{gpu}.sock"), device=dev, name=f"tiny-{d}-{gpu}")
        for _ in range(args.runs + 1):
            r.receive(apply_to_params(params))
            ok = bool(torch.equal(params["tiny.weight"].cpu(), source["tiny.weight"]))
            received[dev.index] = received.get(dev.index, True) and ok
        r.close()

    threads = [threading.Thread(target=engine, args=(d, g), daemon=True)
               for d in range(len(states)) for g in range(args.gpus)]
    for t in threads:
        t.start()
    while True:
        connected = sum(len(x["receivers"]) for d in range(len(states))
                        for x in get(d, "/v1/status")["gpus"])
        if connected >= len(threads):
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
                      "min_ms": times[0], "max_ms": times[-1],
                      "bit_exact": len(received) == len(threads) and all(received.values())}))


if __name__ == "__main__":
    main()
