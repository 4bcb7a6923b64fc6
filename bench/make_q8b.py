"""Writes the standard benchmark checkpoint of ../shared/bench/SPEC.md ("q8b").

Usage: python3 bench/make_q8b.py [--layers 36] [--files 8] [--dir /dev/shm/q8b]
Tensor i is float32 standard normal from a CUDA torch.Generator seeded 1000+i, as bf16;
tensor i goes to file i mod files. Also writes model.safetensors.index.json.
"""
import argparse
import json
import os
import sys

from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integrations"))
from torch_engine import expected, layout  # noqa: E402  (the SPEC layout and contents, in one place)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--dir", default="/dev/shm/q8b")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    names = [f"model-{f + 1:05d}-of-{args.files:05d}.safetensors" for f in range(args.files)]
    shards = [{} for _ in names]
    for i, (name, shape) in enumerate(layout(args.layers)):
        shards[i % args.files][name] = expected(i, shape, "cuda").cpu()
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(args.dir, fname))
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(args.dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(json.dumps({"dir": args.dir, "tensors": len(weight_map), "bytes": total}))


if __name__ == "__main__":
    main()
