"""The trainer of bench/rl_step.sh: q8b (../shared/bench/SPEC.md) on GPU 0, changed every step.

    python3 bench/rl_trainer.py --url http://127.0.0.1:8470 --token T --layers 36 --steps 7 --warmup 2

In one run, printing one JSON line per figure:
- the device-to-host floor: a 4 GiB copy from the GPU into pinned host memory (median of 10);
- staging-area commits of these tensors (StagingArea, written from the GPU before each commit,
  the write outside the timing): commit seconds, and the daemon's copy and hash times;
- RL steps: each step regenerates every tensor for that step (seed 1000 + i + 100003 * step,
  the consumer's --steps rule; outside the timing), then push_cuda, then POST /v1/updates; the
  push, update and total seconds of each step. The first --warmup steps pin the pool's blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from integrations.ckptd.trainer import StagingArea, push_cuda  # noqa: E402
from integrations.torch_engine import STEP_SEED, layout, positive, sparse_step, step_of  # noqa: E402


def call(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    with urllib.request.urlopen(req) as res:
        return json.load(res)


def fill(tensors: dict[str, torch.Tensor], step: int, changing_every: int = 1) -> None:
    """The tensors of `step` (from those of the step before it, under the sparse rule: 0)."""
    for i, t in enumerate(tensors.values()):
        if step > 0 and step_of(i, step, changing_every) == 0:
            continue  # frozen since step 0
        if step > 0 and changing_every == 0:
            sparse_step(t, i, step)
            continue
        g = torch.Generator(device=t.device).manual_seed(1000 + i + STEP_SEED * step)
        t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32))
    torch.cuda.synchronize()


def d2h_floor() -> float:
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(4 << 30, dtype=torch.uint8, pin_memory=True)
    times = []
    for _ in range(11):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst
    return (4 << 30) / statistics.median(times[1:]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--commits", type=int, default=4)
    ap.add_argument("--changing-every", type=positive, default=1, help="after step 0 only every N-th tensor changes")
    ap.add_argument("--base", action="store_true", help="push only the changed tensors, on the previous version")
    ap.add_argument("--atomic", action="store_true", help="updates with cutover atomic (the engine stages, then commits)")
    ap.add_argument("--sparse", action="store_true",
                    help="1%% of the elements of 90%% of the tensors change per step; each update waits for its "
                         "version's deltas (reporting how long they took), and a last step changes one element")
    args = ap.parse_args()
    url, token = args.url, args.token
    torch.cuda.set_device(0)
    tensors = {name: torch.empty(shape, dtype=torch.bfloat16, device="cuda:0") for name, shape in layout(args.layers)}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"what": "checkpoint", "tensors": len(tensors), "bytes": nbytes}), flush=True)
    print(json.dumps({"what": "d2h_floor", "gbps": d2h_floor()}), flush=True)

    fill(tensors, 0)
    area = StagingArea(url, "q8b-staged", tensors, token=token)
    for k in range(args.commits):
        area.write(tensors)
        t0 = time.perf_counter()
        v = area.commit()
        wall = time.perf_counter() - t0
        print(json.dumps({"what": "commit", "k": k, "seconds": wall, "timings": v.get("timings")}), flush=True)
    area.close()
    for v in call(url, token, "GET", "/v1/checkpoints")["checkpoints"]:
        if v["name"] == "q8b-staged":
            call(url, token, "DELETE", f"/v1/checkpoints/{v['id']}")  # its block goes to the pool

    every = 0 if args.sparse else args.changing_every
    previous = None
    for step in range(args.steps):
        fill(tensors, step, every)
        time.sleep(1)  # the consumer's check of the last update is done
        t0 = time.perf_counter()
        if args.base and previous is not None:
            changed = {k: t for i, (k, t) in enumerate(tensors.items()) if step_of(i, step, every) == step}
            pushed = push_cuda(url, "q8b", changed, token=token, base=previous)
        else:
            pushed = push_cuda(url, "q8b", tensors, token=token)
        t1 = time.perf_counter()
        delta = wait_delta(url, token, pushed["id"]) if args.sparse and previous is not None else None
        previous = pushed["id"]
        t2 = time.perf_counter()
        cutover = "atomic" if args.atomic else "direct"
        upd = call(url, token, "POST", "/v1/updates", {"checkpoint": pushed["id"], "cutover": cutover})
        t3 = time.perf_counter()
        print(json.dumps({"what": "step", "step": step, "warmup": step < args.warmup, "push": t1 - t0,
                          "update": t3 - t2, "total": t3 - t2 + t1 - t0, "state": upd.get("state"),
                          "version": pushed["id"], "pushTimings": pushed.get("timings"), "delta": delta,
                          "deltaWait": t2 - t1 if delta else None, "updateBytes": upd.get("progress", {}).get("bytes"),
                          "skipped": upd.get("skipped"), "deltas": upd.get("deltas"), "timings": upd.get("timings"),
                          "atomic": upd.get("atomic"), "windowMs": [r.get("windowMs") for r in upd.get("receivers", [])]}),
              flush=True)
    if args.sparse and previous is not None:
        # One element of one tensor changes: the smallest update there is.
        name, t = next((k, t) for i, (k, t) in enumerate(tensors.items()) if i % 10 == 1)
        t.view(-1)[12345] += 1
        torch.cuda.synchronize()
        pushed = push_cuda(url, "q8b", {name: t}, token=token, base=previous)
        delta = wait_delta(url, token, pushed["id"])
        t0 = time.perf_counter()
        upd = call(url, token, "POST", "/v1/updates", {"checkpoint": pushed["id"]})
        print(json.dumps({"what": "one_element", "update": time.perf_counter() - t0, "state": upd.get("state"),
                          "delta": delta, "updateBytes": upd.get("progress", {}).get("bytes"),
                          "deltas": upd.get("deltas"), "timings": upd.get("timings")}), flush=True)


def wait_delta(url: str, token: str, version: str, limit: float = 60) -> dict | None:
    """The version's deltas once the daemon made them (GET /v1/checkpoints/{id}: delta), or None."""
    until = time.perf_counter() + limit
    while time.perf_counter() < until:
        got = call(url, token, "GET", f"/v1/checkpoints/{version}").get("delta")
        if got:
            return got
        time.sleep(0.01)
    return None


if __name__ == "__main__":
    main()
