"""Mapping the daemon's bucket buffers ("slots") into this process, and the per-tensor views
handed to the engine: torch tensors (CUDA or CPU) or, without torch, memoryviews."""
from __future__ import annotations

import logging
import mmap
import os
import warnings
from typing import TYPE_CHECKING, Any, Protocol, Union

from .cuda import CudaDevice, DevicePointer
from .dtypes import dtype_size, torch_dtype
from .errors import ProtocolError
from .protocol import Message, TensorEntry, piece

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ckptd.receiver")

View = Union["torch.Tensor", memoryview]
"""What `apply` gets for a tensor: a typed torch view, or raw bytes (no torch, or a piece)."""


def import_torch() -> Any:
    """The torch module, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def typed_view(base: Any, t: TensorEntry) -> View:
    """The tensor `t` of a slot whose bytes are `base`: a typed torch view, or raw bytes.
    A piece of a split tensor is always raw bytes (it has no shape of its own)."""
    begin, end = piece(t)
    raw = base[t["offset"]:t["offset"] + end - begin]
    if end - begin != t["bytes"] or "delta" in t:  # a piece, or a delta's bytes (receiver.Delta)
        return raw
    if isinstance(raw, memoryview):  # no torch: the engine gets the bytes (dtype/shape are its)
        return raw
    if t["offset"] % dtype_size(t["dtype"]):
        raise ProtocolError(f"tensor {t['name']}: offset {t['offset']} is not aligned to "
                            f"its {t['dtype']} elements")
    return raw.view(torch_dtype(t["dtype"])).view(tuple(t["shape"]))


class Slot(Protocol):
    """A mapped slot: its size, views of the tensors it holds, and unmapping."""

    bytes: int

    def view(self, t: TensorEntry) -> View: ...

    def close(self) -> None: ...


class HostSlot:
    """A host-backend slot: the daemon's memfd (a /proc/<pid>/fd/<n> path), mapped read-only
    and shared, so the daemon's writes are seen without a copy."""

    def __init__(self, desc: Message, torch: Any = None) -> None:
        self.bytes: int = desc["bytes"]
        fd = os.open(desc["path"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(fd, self.bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the memfd alive
        self._base: Any
        if torch is None:
            self._base = memoryview(self._mm)
        else:
            with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is
                warnings.simplefilter("ignore")
                self._base = torch.frombuffer(self._mm, dtype=torch.uint8)

    def view(self, t: TensorEntry) -> View:
        return typed_view(self._base, t)

    def close(self) -> None:
        if isinstance(self._base, memoryview):
            self._base.release()
        self._base = None
        try:
            self._mm.close()
        except BufferError:
            # The engine kept a view past its ack (against the contract): leave the unmapping
            # to the garbage collector rather than pull the pages from under it.
            log.warning("a view of a host slot is still referenced; unmapping it later")


class CudaSlot:
    """A CUDA slot: the daemon's device buffer opened from its IPC handle, as one uint8 tensor
    that per-tensor views slice. Opened once per buffers generation, because opening an IPC
    handle costs far more than slicing."""

    def __init__(self, desc: Message, dev: CudaDevice) -> None:
        self.bytes: int = desc["bytes"]
        self._dev = dev
        self._ptr: int | None = dev.open(desc["handle"])
        self._base: Any = dev.torch.as_tensor(DevicePointer(self._ptr, self.bytes), device=dev.device)

    def view(self, t: TensorEntry) -> View:
        return typed_view(self._base, t)

    def close(self) -> None:
        # Only called after the last ack, i.e. after the engine's copies completed; the views
        # (which torch does not own) must be gone by then.
        self._base = None
        if self._ptr is not None:
            self._dev.close(self._ptr)
            self._ptr = None


class Mapper:
    """Turns the daemon's slot descriptions into mapped slots, and waits for the engine's
    device work before an ack. The default for engines; a test injects its own object with
    the same two methods (`map(desc, welcome)`, `sync()`).

    device: the torch device of the engine (None: for CUDA slots, the GPU whose UUID the
    daemon announced). use_torch: host slots give torch CPU tensors (default: if torch can be
    imported) or, when False, memoryviews of the raw bytes."""

    def __init__(self, device: Any = None, use_torch: bool | None = None) -> None:
        self.device = device
        self._torch = import_torch() if use_torch is not False else None
        if use_torch and self._torch is None:
            raise ImportError("use_torch=True, but torch cannot be imported")
        self._cuda: CudaDevice | None = None

    def map(self, desc: Message, welcome: Message) -> Slot:
        kind = desc.get("kind")
        if kind == "host":
            return HostSlot(desc, self._torch)
        if kind == "cuda":
            if self._torch is None:
                raise RuntimeError("CUDA slots need torch")
            if self._cuda is None:
                self._cuda = CudaDevice(self._torch, self.device, welcome.get("uuid", ""))
            return CudaSlot(desc, self._cuda)
        raise ProtocolError(f"slot {desc.get('slot')}: unknown kind {kind!r}")

    def staging(self, nbytes: int, like: Any) -> Any:
        """Memory for assembling a tensor larger than a bucket, where its pieces (`like`, a
        View) live: a uint8 tensor on their device, or a bytearray."""
        torch = self._torch
        if torch is not None and isinstance(like, torch.Tensor):
            return torch.empty(nbytes, dtype=torch.uint8, device=like.device)
        return bytearray(nbytes)

    def sync(self) -> None:
        """Waits until the copies the engine queued from the views have completed: the daemon
        overwrites the slot as soon as it reads the ack, so an ack sent while a copy is still
        queued on the GPU would let the copy read the next bucket's bytes."""
        torch = self._torch
        if self._cuda is not None:
            self._cuda.sync()
        elif torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            # Host slot copied to a GPU (non_blocking copies from pageable memory may still be
            # in flight): same rule.
            dev = self.device if self.device is not None else torch.cuda.current_device()
            if torch.device(dev).type == "cuda":
                torch.cuda.current_stream(dev).synchronize()

    def close(self) -> None:
        """Releases the CUDA context reference taken to open handles (after the slots closed)."""
        if self._cuda is not None:
            self._cuda.release()
            self._cuda = None
