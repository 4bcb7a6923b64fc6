"""Reference: torch's pinned host-to-device copy, timed like bench/h2d.ts.

Usage: python3 bench/torch_h2d.py [GiB]. Prints one JSON line: bytes, median seconds, GB/s.
"""
import json
import sys
import time

import torch

gib = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
n = int(gib * 2**30)
src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
src[: 1 << 20] = torch.arange(1 << 20, dtype=torch.int64).remainder(251).to(torch.uint8)
dst = torch.empty(n, dtype=torch.uint8, device="cuda")


def once():
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


once()
times = sorted(once() for _ in range(10))
median = (times[4] + times[5]) / 2
wrong = int((dst[: 1 << 20].cpu() != src[: 1 << 20]).sum())
print(json.dumps({"what": "h2d via torch", "device": torch.cuda.get_device_name(0), "bytes": n,
                  "seconds": median, "gbps": n / median / 1e9, "min": times[0], "max": times[-1],
                  "wrong": wrong}))
