"""Tensor parallel 2 on one GPU: two processes, each a rank holding its shard of a transformers
model, receive one update through ckptd's vLLM weight transfer backend, bit-exact.

    PYTHONPATH=. python3 bench/tp_model.py --url http://127.0.0.1:8470 --socket-dir STATE/sockets --tokens STATE/tokens

Each rank builds the same small Qwen3 (bf16 on cuda:0; its parameters require grad) and cuts
it as vLLM's parallel layers do (vllm/model_executor/layers/linear.py): q/k/v and gate/up by
output rows, o and down by input columns, the rest whole. Its `load_weights` takes the full
HF-named tensors and copies its rank's slice, as those layers' weight loaders do. The rank is
driven the way vLLM's worker drives a weight transfer engine (vLLM is not installed here: the
stand-ins of integrations/tests/vllm_standins.py provide its base class, factory and worker
session), so the receiver path is ckptd.vllm.transfer's, on real CUDA IPC from the daemon.
The parent pushes new weights through /dev/shm once both ranks are connected, starts the update,
and checks what each rank reports: every shard equal to the matching slice of the pushed
tensors, bit for bit, and every parameter still requiring grad. Prints one JSON line; exits 1
on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import types
import urllib.request

SEED = 1234
TP = 2


def config():
    from transformers import Qwen3Config
    return Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False)


def new_weights(shapes):
    """The weights the trainer pushes (the same in every process: seeded, on the CPU)."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    return {n: torch.randn(shape, generator=g).to(torch.bfloat16) for n, shape in sorted(shapes.items())}


ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COLS = ("o_proj", "down_proj")


def shard(name, t, rank):
    """Rank `rank`'s part of the full tensor `name`, as vLLM's parallel linear layers cut it."""
    part = name.split(".")[-2] if name.endswith(".weight") else ""
    if part in ROWS:
        n = t.shape[0] // TP
        return t[rank * n:(rank + 1) * n]
    if part in COLS:
        n = t.shape[1] // TP
        return t[:, rank * n:(rank + 1) * n]
    return t


class ShardedModel:
    """A transformers model cut to one rank, with vLLM's `load_weights(iterable of (name, full tensor))`."""

    def __init__(self, rank):
        import torch
        from transformers import Qwen3ForCausalLM
        torch.manual_seed(0)
        self.rank = rank
        model = Qwen3ForCausalLM(config()).to(device="cuda:0", dtype=torch.bfloat16)
        self.full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for name, p in list(model.named_parameters()):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            cut = shard(name, p.detach(), rank).clone()
            setattr(module, name.rsplit(".", 1)[1], torch.nn.Parameter(cut, requires_grad=True))
        self.model = model
        self.params = dict(model.named_parameters())
        self.calls = 0

    def load_weights(self, weights):
        import torch
        self.calls += 1
        with torch.no_grad():
            for name, full in weights:
                self.params[name].copy_(shard(name, full, self.rank))


def rank_main(rank, socket_dir, ready, go, results):
    try:
        import torch
        from integrations.tests import vllm_standins as vs
        sys.modules.update(vs.install())
        from integrations.ckptd.vllm import plugin
        plugin.register()
        model = ShardedModel(rank)
        worker = vs.Worker("ckptd", model, types.SimpleNamespace(quantization=None, use_mla=False), device="cuda:0")
        worker.init_weight_transfer_engine({"socket_dir": socket_dir, "timeout_s": 120})
        ready.put((rank, model.full_shapes))
        go.get()
        worker.start_weight_update()
        worker.update_weights({})
        worker.finish_weight_update()
        torch.cuda.synchronize()
        new = new_weights(model.full_shapes)
        mismatched = [n for n, p in model.params.items()
                      if not torch.equal(p.detach().cpu().view(torch.int16), shard(n, new[n], rank).view(torch.int16))]
        summary = worker.engine.last_summary or {}
        results.put({"rank": rank, "mismatched": mismatched[:10], "params": len(model.params),
                     "requires_grad": all(p.requires_grad for p in model.params.values()),
                     "load_calls": model.calls, "tensors": summary.get("tensors"), "bytes": summary.get("bytes"),
                     "shard_bytes": sum(p.numel() * p.element_size() for p in model.params.values())})
        worker.engine.shutdown()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--socket-dir", required=True)
    ap.add_argument("--tokens")
    args = ap.parse_args()
    from integrations.trainer_push import push_shm, token_from
    token = token_from(args.tokens)
    ctx = mp.get_context("spawn")
    ready, results, gos = ctx.Queue(), ctx.Queue(), [ctx.Queue() for _ in range(TP)]
    procs = [ctx.Process(target=rank_main, args=(r, args.socket_dir, ready, gos[r], results)) for r in range(TP)]
    for p in procs:
        p.start()
    shapes = None
    for _ in range(TP):
        rank, shapes = ready.get(timeout=300)
    push_shm(args.url, "tp-model", new_weights(shapes), token=token)
    for q in gos:
        q.put(True)
    req = urllib.request.Request(f"{args.url}/v1/updates", data=json.dumps({"checkpoint": "tp-model"}).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=300) as res:
        update = json.load(res)
    ranks = sorted((results.get(timeout=300) for _ in range(TP)), key=lambda r: r["rank"])
    for p in procs:
        p.join(60)
    ok = update.get("state") == "succeeded" and all(
        "error" not in r and not r["mismatched"] and r["requires_grad"] for r in ranks)
    print(json.dumps({"ok": ok, "update": update.get("state"), "receivers": update.get("receivers"),
                      "seconds": update.get("timings", {}).get("seconds"), "ranks": ranks}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
