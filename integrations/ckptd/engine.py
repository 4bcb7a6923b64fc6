"""Helpers for engines: an `apply` that loads into a dict of parameters, and the socket path
of this process's GPU."""
from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from .receiver import Apply, Batch
from .slots import View, import_torch


def apply_to_params(params: Mapping[str, Any], counts: collections.Counter[str] | None = None) -> Apply:
    """An `apply` that copies each received tensor into params[name] (a dict of tensors, e.g.
    dict(model.named_parameters())), on the current stream. Names not in params are returned
    (the receiver reports them as "unknown"), not an error. counts: an optional
    collections.Counter incremented per applied name.

    The copies run under torch.no_grad(): loading weights is not part of any graph, and
    autograd refuses an in-place copy into a leaf that requires grad (every parameter of a
    model being trained); `requires_grad` stays as it was."""
    torch = import_torch()
    no_grad: Callable[[], contextlib.AbstractContextManager[Any]] = (
        torch.no_grad if torch is not None else contextlib.nullcontext)

    def apply(batch: Batch) -> list[str]:
        unknown = []
        with no_grad():
            for name, view in batch:
                p = params.get(name)
                if p is None:
                    unknown.append(name)
                    continue
                shape = tuple(view.shape or ())
                if tuple(p.shape) != shape:
                    # copy_ would broadcast a smaller tensor silently
                    raise ValueError(f"{name}: received shape {list(shape)}, "
                                     f"parameter has {list(p.shape)}")
                p.copy_(view, non_blocking=True)
                if counts is not None:
                    counts[name] += 1
        return unknown

    def piece(name: str, view: View, begin: int, total: int) -> None:
        # A piece of a tensor larger than a bucket goes straight into place, as bytes.
        p = params.get(name)
        if p is None:
            return
        if p.numel() * p.element_size() != total or not p.is_contiguous():
            raise ValueError(f"{name}: a {total}-byte tensor cannot land in this parameter")
        if isinstance(view, memoryview):
            raise TypeError(f"{name}: pieces need torch views")
        with no_grad():
            flat = p.view(-1).view(view.dtype)
            flat[begin:begin + view.numel()].copy_(view, non_blocking=True)
        if counts is not None and begin + view.numel() == total:
            counts[name] += 1

    apply.piece = piece  # type: ignore[attr-defined]
    return apply


def physical_gpu_index(local_index: int, visible: str | None = None) -> int:
    """The host-wide index of this process's CUDA device `local_index`, i.e. the index the
    daemon uses in gpu-<index>.sock: CUDA_VISIBLE_DEVICES renumbers devices from 0 inside a
    process, so local device i is the i-th entry of that list. Without the variable, the same
    index. Entries given as UUIDs cannot be mapped to an index: pass the socket path instead."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is None or visible.strip() == "":
        return local_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if local_index >= len(entries):
        raise ValueError(f"device {local_index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[local_index]
    if not entry.isdigit():
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is not an index; give the "
                         f"receiver the gpu-<index>.sock path explicitly")
    return int(entry)


def gpu_socket_path(socket_dir: str, local_index: int) -> str:
    """`<socket_dir>/gpu-<physical index>.sock` for this process's CUDA device `local_index`."""
    return os.path.join(socket_dir, f"gpu-{physical_gpu_index(local_index)}.sock")
