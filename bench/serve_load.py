"""A serving-like load on a GPU, for bench/serve_while_update.sh: forward passes of a ~1.3B
Qwen3 built from a config (offline, bf16, random weights), 16 sequences of 256 tokens each,
back to back, each synchronized; every step's start and end (time.time()) go to --out as
one JSON line, until --seconds have passed.

    python3 bench/serve_load.py --out steps.jsonl --seconds 60
"""
import argparse
import json
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--layers", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         vocab_size=151936, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).to(device="cuda:0", dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, config.vocab_size, (16, 256), device="cuda:0")
    with torch.no_grad(), open(args.out, "w") as out:
        out.write(json.dumps({"params": params}) + "\n")
        for _ in range(3):  # warm-up
            model(tokens)
        torch.cuda.synchronize()
        until = time.time() + args.seconds
        while time.time() < until:
            t0 = time.time()
            model(tokens)
            torch.cuda.synchronize()
            out.write(json.dumps({"t0": t0, "t1": time.time()}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
