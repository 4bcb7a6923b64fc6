"""The plain torch engine: the benchmark consumer of ../shared/bench/SPEC.md.

    python3 -m integrations.torch_engine --socket ~/.local/state/ckptd/sockets/gpu-0.sock --device cuda:0 \\
        --layers 36 [--updates N] [--check-every 7]
    (or python3 integrations/torch_engine.py ..., as bench/*.sh run it)

Holds every tensor of the "q8b" layout as a preallocated bf16 tensor on the device, fills them
with NaN before each update, receives the update through the receiver (apply_to_params),
then checks: every tensor was applied exactly once, and every 7th tensor (index i % 7 == 0 in
the layout's order) equals its regenerated value bit for bit. Prints one JSON line per update;
after --updates updates, exits 1 if any failed. The NaN fill and the check are outside
"seconds", which is the receiver's time from `begin` to `done`.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

if not __package__:  # run as a script, or imported with integrations/ on sys.path (bench/)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ckptd import ReceiveError, Receiver, UpdateAborted, apply_to_params  # noqa: E402


def layout(layers: int) -> Iterator[tuple[str, list[int]]]:
    """(name, shape) of every tensor of q8b with `layers` layers, in SPEC order."""
    h, inter, kv, vocab = 4096, 12288, 1024, 151936
    yield "model.embed_tokens.weight", [vocab, h]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        yield p + "self_attn.q_proj.weight", [h, h]
        yield p + "self_attn.k_proj.weight", [kv, h]
        yield p + "self_attn.v_proj.weight", [kv, h]
        yield p + "self_attn.o_proj.weight", [h, h]
        yield p + "mlp.gate_proj.weight", [inter, h]
        yield p + "mlp.up_proj.weight", [inter, h]
        yield p + "mlp.down_proj.weight", [h, inter]
        yield p + "input_layernorm.weight", [h]
        yield p + "post_attention_layernorm.weight", [h]
    yield "model.norm.weight", [h]
    yield "lm_head.weight", [vocab, h]


def expected(i: int, shape: list[int], device: torch.device | str, step: int = 0) -> torch.Tensor:
    """Tensor i of the checkpoint: float32 standard normal from a CUDA generator seeded
    1000+i, as bf16. An RL step s changes every tensor: seed 1000 + i + STEP_SEED * s."""
    g = torch.Generator(device=device).manual_seed(1000 + i + STEP_SEED * step)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)


STEP_SEED = 100_003

SPARSE_STRIDE = 100
"""Sparse steps (bench/rl_step.sh SPARSE=1): a step changes every 100th element (1%)..."""
SPARSE_FROZEN = 10
"""...of every tensor but every 10th one (90% of them), which keeps step 0's contents."""


def step_of(i: int, step: int, changing_every: int) -> int:
    """The RL step whose contents tensor i holds at `step` when only every `changing_every`-th
    tensor changes after step 0 (bench/rl_step.sh CHANGING_EVERY): the others keep step 0's.
    changing_every 0: the sparse rule, where all but every SPARSE_FROZEN-th tensor change."""
    if changing_every == 0:
        return 0 if i % SPARSE_FROZEN == 0 else step
    return step if i % changing_every == 0 else 0


def sparse_step(t: torch.Tensor, i: int, step: int) -> None:
    """Sparse step `step` (>= 1) on tensor i, in place: every SPARSE_STRIDE-th element from an
    offset that moves with the step takes a new value (a CUDA generator seeded 1000 + i +
    STEP_SEED * step), so positions and values are pure functions of (i, step)."""
    flat = t.view(-1)
    off = (7 * step + i) % SPARSE_STRIDE
    n = flat[off::SPARSE_STRIDE].numel()
    g = torch.Generator(device=t.device).manual_seed(1000 + i + STEP_SEED * step)
    flat[off::SPARSE_STRIDE] = torch.randn(n, generator=g, device=t.device, dtype=torch.float32).to(t.dtype)


def contents(i: int, shape: list[int], device: torch.device | str, step: int, changing_every: int) -> torch.Tensor:
    """Tensor i at `step`: step_of's step of `expected`, or under the sparse rule (changing_every
    0) step 0's tensor with every sparse step up to `step` applied."""
    if changing_every != 0:
        return expected(i, shape, device, step_of(i, step, changing_every))
    t = expected(i, shape, device, 0)
    for s in range(1, step_of(i, step, 0) + 1):
        sparse_step(t, i, s)
    return t


def check(params: dict[str, torch.Tensor], names: list[str], counts: collections.Counter[str],
          unknown: list[str], check_every: int, device: torch.device | str, step: int = 0,
          changing_every: int = 1, held: dict[str, int] | None = None,
          ) -> tuple[bool, int, list[str], list[str], list[str]]:
    """The SPEC's correctness rule for one update; returns the report's fields. `held`: the step
    whose contents each param held before it (a partial update); a tensor the update left out
    is missing unless it held what this step wants already."""
    missing = [n for i, n in enumerate(names)
               if counts[n] == 0 and (held is None or held[n] != step_of(i, step, changing_every))]
    repeated = [n for n in names if counts[n] > 1]
    mismatched: list[str] = []
    checked = 0
    for i, name in enumerate(names):
        if i % check_every:
            continue
        want = contents(i, list(params[name].shape), device, step, changing_every)
        # Compare bits (int16 views): NaN != NaN, and -0.0 == 0.0, would fool torch.equal.
        if not torch.equal(params[name].view(torch.int16), want.view(torch.int16)):
            mismatched.append(name)
        checked += 1
        del want
    ok = not (missing or repeated or mismatched or unknown)
    return ok, checked, mismatched, missing, repeated


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="the daemon's gpu-<index>.sock")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--updates", type=int, default=0, help="stop after N updates (0: never)")
    ap.add_argument("--check-every", type=int, default=7)
    ap.add_argument("--steps", action="store_true",
                    help="update u carries RL step u's contents (bench/rl_step.sh), not the SPEC's")
    ap.add_argument("--partial", action="store_true",
                    help="say partial: updates may leave out what this engine holds (no NaN fill between them)")
    ap.add_argument("--changing-every", type=positive, default=1,
                    help="with --steps: after step 0 only every N-th tensor changes (the trainer's rule)")
    ap.add_argument("--sparse", action="store_true",
                    help="with --steps: the sparse rule (1%% of the elements of 90%% of the tensors change per "
                         "step); implies --partial, and takes deltas")
    ap.add_argument("--hold-after", type=positive, default=None,
                    help="with --steps: updates after the N-th carry step N-1's contents again (checked ones)")
    ap.add_argument("--stage-bytes", type=int, default=0,
                    help="memory this engine may spend staging an atomic update (0: none)")
    ap.add_argument("--name", default=None, help="receiver name in the daemon's logs")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for each daemon message (default: forever)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    device = torch.device(args.device)
    torch.cuda.set_device(device)
    names: list[str] = []
    params: dict[str, torch.Tensor] = {}
    for name, shape in layout(args.layers):
        names.append(name)
        params[name] = torch.empty(shape, dtype=torch.bfloat16, device=device)

    every = 0 if args.sparse else args.changing_every
    partial = args.partial or args.sparse
    receiver = Receiver(args.socket, device=device, name=args.name, timeout=args.timeout, partial=partial,
                        deltas=args.sparse, stage_bytes=args.stage_bytes)
    failed = done = 0
    held: dict[str, int] | None = None  # with --partial: the step each param holds, once known
    try:
        while args.updates == 0 or done < args.updates:
            if held is None:  # a whole update is wanted: every tensor must come
                for p in params.values():
                    p.fill_(float("nan"))
            torch.cuda.synchronize(device)  # the fill must not run inside the timed update
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            counts: collections.Counter[str] = collections.Counter()
            line: dict[str, Any] = {"update": None, "checkpoint": None, "ok": False, "applied": 0, "checked": 0,
                    "mismatched": [], "seconds": None, "peak_extra_bytes": 0}
            try:
                s = receiver.receive(apply_to_params(params, counts))
                # This process's extra allocations while it applied (the torch allocator's peak):
                # the daemon's buffers are its own; device-wide figures are the benchmark's.
                peak = torch.cuda.max_memory_allocated(device) - base
                step = done if args.steps else 0
                if args.hold_after is not None:
                    step = min(step, args.hold_after - 1)
                ok, checked, mismatched, missing, repeated = check(
                    params, names, counts, s["unknown"], args.check_every, device, step, every, held)
                held = ({n: step_of(i, step, every) for i, n in enumerate(names)}
                        if ok and partial else None)
                line.update(update=s["update"], checkpoint=s["checkpoint"], ok=ok,
                            applied=sum(counts.values()), checked=checked, mismatched=mismatched,
                            seconds=round(s["seconds"], 6), peak_extra_bytes=peak, bytes=s["bytes"],
                            buckets=s["buckets"], apply_seconds=round(s["apply_seconds"], 6),
                            window_seconds=s["window_seconds"])
                for key, val in (("missing", missing), ("repeated", repeated),
                                 ("unknown", s["unknown"])):
                    if val:
                        line[key] = val[:20] + ([f"... {len(val) - 20} more"] if len(val) > 20 else [])
            except UpdateAborted as e:
                held = None
                line.update(update=e.update, applied=sum(counts.values()), aborted=e.reason)
            except ReceiveError as e:
                held = None
                line.update(update=e.update, applied=sum(counts.values()), error=str(e))
            done += 1
            failed += not line["ok"]
            print(json.dumps(line), flush=True)
    finally:
        receiver.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
