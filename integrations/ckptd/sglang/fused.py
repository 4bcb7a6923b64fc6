"""Keeping fused tensors in one `load_weights` call.

Some SGLang models fuse two checkpoint tensors into one parameter inside a single
`load_weights` call, through a dict local to that call: DeepSeek V2/V3 concatenate
`...self_attn.q_a_proj.<suffix>` and `...self_attn.kv_a_proj_with_mqa.<suffix>` (same suffix:
`.weight`, `.weight_scale_inv`, ...) into `...fused_qkv_a_proj_with_mqa.<suffix>`
(upstream `python/sglang/srt/models/deepseek_common/deepseek_weight_loader.py`,
`DeepseekV2WeightLoaderMixin.do_load_weights`; older builds inline it in
`python/sglang/srt/models/deepseek_v2.py`). Half a pair in a call is dropped when the call
returns, silently, and the fused parameter keeps its old value. The daemon buckets by bytes,
so a pair may be split over two buckets, i.e. two calls: the grouping here holds a copy of the
first half until its partner comes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..receiver import Apply, Batch, Finish

log = logging.getLogger("ckptd.sglang")

Rule = tuple[str, str]
"""Two name parts that name partners: swapping one for the other gives the partner's name."""

DEFAULT_RULES: tuple[Rule, ...] = ((".self_attn.q_a_proj.", ".self_attn.kv_a_proj_with_mqa."),)

Load = Callable[[list[tuple[str, Any]]], object]
"""What receives each group of tensors: `model.load_weights`."""


def partner(name: str, rules: Iterable[Rule] = DEFAULT_RULES) -> str | None:
    """The name of the tensor that must reach the same `load_weights` call as `name`, or None."""
    for a, b in rules:
        if a in name:
            return name.replace(a, b, 1)
        if b in name:
            return name.replace(b, a, 1)
    return None


def rules_for(model: Any) -> tuple[Rule, ...]:
    """The rules that apply to `model`: none for a DeepSeek config whose `q_lora_rank` is None
    (DeepSeek-V2-Lite), which loads `kv_a_proj_with_mqa` alone, unfused (the fusion runs only
    when `config.q_lora_rank is not None`, deepseek_weight_loader.py); DEFAULT_RULES otherwise,
    harmless for models whose names never match them."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "q_lora_rank") and config.q_lora_rank is None:
        return ()
    return DEFAULT_RULES


def copy_view(view: Any) -> Any:
    """A copy of a receiver view that outlives the bucket's ack: `bytes` of a memoryview, a
    clone (same device, dtype and shape) of a torch tensor."""
    if isinstance(view, memoryview):
        return bytes(view)
    return view.clone()


class FusedGroups:
    """Splits each bucket into what can be loaded now and what must wait for its partner.

    A tensor whose partner (see `partner`) is in the same bucket, or already held, is ready; a
    tensor whose partner has not come yet is copied and held. One instance per update: what is
    held belongs to that update."""

    def __init__(self, rules: Iterable[Rule] = DEFAULT_RULES) -> None:
        self.rules = tuple(rules)
        self._held: dict[str, Any] = {}

    @property
    def held(self) -> list[str]:
        """The names held, waiting for their partner."""
        return list(self._held)

    def take(self, batch: Batch) -> list[tuple[str, Any]]:
        """The tensors of `batch` to load now, with the held partners they release, each right
        after its partner; the rest of `batch` is copied and held (its views die at the ack)."""
        names = {name for name, _ in batch}
        ready: list[tuple[str, Any]] = []
        for name, view in batch:
            other = partner(name, self.rules)
            if other is None or other in names:
                ready.append((name, view))
            elif other in self._held:
                ready.append((name, view))
                ready.append((other, self._held.pop(other)))
            else:
                self._held[name] = copy_view(view)
        return ready

    def release(self) -> list[tuple[str, Any]]:
        """Everything still held, which this instance then forgets."""
        left, self._held = list(self._held.items()), {}
        return left


def grouped_loader(load: Load, rules: Iterable[Rule] = DEFAULT_RULES) -> tuple[Apply, Finish]:
    """The receiver's `apply` and `finish` for one update into `load` (`model.load_weights`).

    apply calls `load` once per bucket, with the bucket's ready tensors and the partners they
    release (not at all for a bucket whose tensors are all held). finish loads whatever is
    still held, in one last call, and names it in a warning: a partner that never came (the
    model drops such a half, but loading it is all that can be done here)."""
    groups = FusedGroups(rules)

    def apply(batch: Batch) -> None:
        ready = groups.take(batch)
        if ready:
            load(ready)

    def finish() -> None:
        left = groups.release()
        if left:
            log.warning("ckptd: %d tensors came without their fused partner, loaded alone at "
                        "the end of the update: %s", len(left), ", ".join(n for n, _ in left))
            load(left)

    return apply, finish
