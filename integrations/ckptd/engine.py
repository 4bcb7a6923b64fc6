"""Helpers for engines: an `apply` that loads into a dict of parameters, and the socket path
of this process's GPU."""
from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from .receiver import Apply, Batch, Delta
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
            patches = [(name, d) for name, d in batch if isinstance(d, Delta)]
            unknown += apply_deltas(params, patches, counts)
            for name, view in batch:
                if isinstance(view, Delta):
                    continue
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


def apply_deltas(params: Mapping[str, Any], patches: list[tuple[str, Delta]],
                 counts: collections.Counter[str] | None = None) -> list[str]:
    """Patches each parameter in place with its Delta (a scatter on the current stream), after
    checking every patch of the batch first: its parameter is contiguous, of the delta's dtype
    and size, and its last position (positions ascend, PROTOCOL.md) is inside it (one sync for
    all of them: an index out of range on a CUDA device would end the process's CUDA context,
    not raise). Returns the names not in params."""
    torch = import_torch()
    unknown, todo = [], []
    for name, d in patches:
        p = params.get(name)
        if p is None:
            unknown.append(name)
            continue
        if not p.is_contiguous() or p.numel() != d.numel:
            raise ValueError(f"{name}: a delta of a {d.numel}-element tensor cannot patch this "
                             f"{'non-contiguous ' if not p.is_contiguous() else ''}{p.numel()}-element parameter")
        if isinstance(d.values, memoryview) or torch is None:
            raise TypeError(f"{name}: deltas need torch views")
        if d.values.dtype != p.dtype:
            raise ValueError(f"{name}: a delta of {d.values.dtype} cannot patch a {p.dtype} parameter")
        if d.positions.numel() > 0:
            todo.append((name, p, d))
    if todo:
        # A bucket's deltas are all in its slot, on one device, positions ascending: one copy of
        # their last positions checks them all.
        last = torch.stack([d.positions[-1] for _, _, d in todo]).cpu()
        for (name, _, d), m in zip(todo, last.tolist()):
            if m >= d.numel or m < 0:
                raise ValueError(f"{name}: the delta's position {m} is past the tensor's {d.numel} elements")
    for name, p, d in todo:
        index, values = d.positions, d.values
        if index.device != p.device:
            index, values = index.to(p.device, non_blocking=True), values.to(p.device, non_blocking=True)
        p.view(-1)[index if _int32_indexes(torch) else index.long()] = values
        if counts is not None:
            counts[name] += 1
    return unknown


_INT32_INDEXES: list[bool] = []


def _int32_indexes(torch: Any) -> bool:
    """Whether this torch indexes with int32 tensors (2.x does; 1.x wants int64 copies)."""
    if not _INT32_INDEXES:
        try:
            torch.zeros(1)[torch.zeros(1, dtype=torch.int32)] = 1
            _INT32_INDEXES.append(True)
        except (IndexError, RuntimeError):
            _INT32_INDEXES.append(False)
    return _INT32_INDEXES[0]


def visible_entry(local_index: int, visible: str | None = None) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's CUDA device `local_index` (CUDA numbers
    the visible devices from 0 inside a process, in the order of that list): an index, a GPU
    UUID or a unique prefix of one. Without the variable, the index itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is None or visible.strip() == "":
        return str(local_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if local_index >= len(entries):
        raise ValueError(f"device {local_index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    return entries[local_index]


def physical_gpu_index(local_index: int, visible: str | None = None) -> int:
    """The host-wide index of this process's CUDA device `local_index`, i.e. the index the
    daemon uses in gpu-<index>.sock. Entries given as UUIDs have no index: `gpu_socket_path`
    finds their socket by UUID."""
    entry = visible_entry(local_index, visible)
    if not entry.isdigit():
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is not an index; find its socket "
                         f"by UUID with gpu_socket_path")
    return int(entry)


def gpu_socket_path(socket_dir: str, local_index: int, visible: str | None = None) -> str:
    """The daemon's socket for this process's CUDA device `local_index`: `<socket_dir>/gpu-<i>.sock`
    for an index, or, when CUDA_VISIBLE_DEVICES names the device by UUID (or a unique prefix
    of one, as CUDA accepts), the daemon's link `<socket_dir>/<uuid>.sock` to that GPU's socket."""
    entry = visible_entry(local_index, visible)
    if entry.isdigit():
        return os.path.join(socket_dir, f"gpu-{int(entry)}.sock")
    try:
        names = os.listdir(socket_dir)
    except OSError as e:
        raise ValueError(f"cannot list the daemon's socket directory {socket_dir}: {e}") from None
    links = sorted(n for n in names if n.endswith(".sock") and not n.startswith("gpu-")
                   and n.startswith(entry))
    if len(links) != 1:
        known = sorted(n[:-5] for n in names if n.endswith(".sock") and not n.startswith("gpu-"))
        what = "no" if not links else "more than one"
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {what} GPU of the daemon "
                         f"under {socket_dir} (its GPUs: {', '.join(known) or 'none by UUID'})")
    return os.path.join(socket_dir, links[0])
