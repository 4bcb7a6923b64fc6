"""The CUDA side of the receiver: a ctypes binding of the few driver calls that open the
daemon's IPC handles (libcuda.so.1), and the engine's view of the daemon's GPU."""
from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ProtocolError

if TYPE_CHECKING:
    import torch


class IpcHandle(ctypes.Structure):  # CUipcMemHandle, passed by value
    _fields_ = [("reserved", ctypes.c_char * 64)]


class CudaDriver:
    """libcuda.so.1, with the calls the receiver needs; `call` raises on any error.

    The driver API with an explicit primary context is used rather than the runtime, so the
    handle opens in the context torch uses for that device, whatever is current on this thread
    and whichever libcudart copy torch bundles."""

    IpcHandle = IpcHandle

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        c_int, c_uint, c_void_p, c_u64, P = (ctypes.c_int, ctypes.c_uint, ctypes.c_void_p,
                                             ctypes.c_uint64, ctypes.POINTER)
        self.fn: dict[str, Any] = {}
        for name, args in [
            ("cuInit", [c_uint]),
            ("cuDeviceGetCount", [P(c_int)]),
            ("cuDeviceGet", [P(c_int), c_int]),
            ("cuDeviceGetUuid_v2|cuDeviceGetUuid", [c_void_p, c_int]),
            ("cuDevicePrimaryCtxRetain", [P(c_void_p), c_int]),
            ("cuDevicePrimaryCtxRelease_v2|cuDevicePrimaryCtxRelease", [c_int]),
            ("cuCtxPushCurrent_v2", [c_void_p]),
            ("cuCtxPopCurrent_v2", [P(c_void_p)]),
            ("cuIpcOpenMemHandle_v2|cuIpcOpenMemHandle", [P(c_u64), IpcHandle, c_uint]),
            ("cuIpcCloseMemHandle", [c_u64]),
            ("cuGetErrorName", [c_int, P(ctypes.c_char_p)]),
        ]:
            for sym in name.split("|"):
                f = getattr(lib, sym, None)
                if f is not None:
                    f.argtypes, f.restype = args, c_int
                    self.fn[name.split("|")[0].removesuffix("_v2")] = f
                    break
            else:
                raise RuntimeError(f"libcuda.so.1 lacks {name}")
        self.call("cuInit", 0)

    def call(self, name: str, *args: Any) -> None:
        rc = self.fn[name](*args)
        if rc != 0:
            s = ctypes.c_char_p()
            self.fn["cuGetErrorName"](rc, ctypes.byref(s))
            raise RuntimeError(f"{name} failed: {(s.value or b'?').decode()} ({rc})")

    def uuid(self, ordinal: int) -> str:
        """The UUID of device `ordinal` (as numbered in this process), as 32 hex digits."""
        dev, raw = ctypes.c_int(), (ctypes.c_char * 16)()
        self.call("cuDeviceGet", ctypes.byref(dev), ordinal)
        self.call("cuDeviceGetUuid", ctypes.byref(raw), dev.value)
        return bytes(raw).hex()

    def count(self) -> int:
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return n.value


class UuidSource(Protocol):
    """What finding the daemon's GPU needs of a driver (CudaDriver, or a test's stand-in)."""

    def uuid(self, ordinal: int) -> str: ...

    def count(self) -> int: ...


def uuid_hex(uuid: object) -> str:
    """"GPU-xxxxxxxx-xxxx-..." (the daemon's form) -> 32 lowercase hex digits."""
    u = str(uuid).lower().removeprefix("gpu-")
    return "".join(c for c in u if c in "0123456789abcdef")


def find_ordinal(driver: UuidSource, uuid: str, index: int | None) -> int:
    """The ordinal, in this process, of the GPU the daemon announced as `uuid`.

    index None: the daemon's GPU is looked for among the visible ones by UUID, which is
    robust to any CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER difference between daemon and
    engine. index given: that device must be the daemon's GPU (a daemon that announced no
    UUID is taken at its word)."""
    want = uuid_hex(uuid)
    if index is None:
        found = [i for i in range(driver.count()) if driver.uuid(i) == want]
        if not want or not found:
            raise RuntimeError(f"the daemon's GPU {uuid} is not visible to this process "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        return found[0]
    if want:
        have = driver.uuid(index)
        if have != want:
            raise RuntimeError(f"this socket serves GPU {uuid}, but cuda:{index} here is "
                               f"GPU-{have}: wrong socket for this device (check CUDA_VISIBLE_DEVICES)")
    return index


class CudaDevice:
    """This process's view of the daemon's GPU: its ordinal here, its primary context, and
    the IPC mappings opened in it.

    device: the engine's torch device (None: the GPU whose UUID the daemon announced, found
    by find_ordinal). driver: a CudaDriver (default: a new one)."""

    def __init__(self, torch: Any, device: torch.device | str | int | None, uuid: str,
                 driver: CudaDriver | None = None) -> None:
        self.torch = torch
        self.drv = driver if driver is not None else CudaDriver()
        index: int | None = None
        if device is not None:
            d = torch.device(device)
            index = d.index if d.index is not None else torch.cuda.current_device()
        self.index = find_ordinal(self.drv, uuid, index)
        self.device = torch.device("cuda", self.index)
        torch.zeros(1, device=self.device)  # torch's context for the device exists (README)
        dev = ctypes.c_int()
        self.drv.call("cuDeviceGet", ctypes.byref(dev), self.index)
        self._cu_device = dev.value
        self._ctx = ctypes.c_void_p()
        self.drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(self._ctx), self._cu_device)

    def _in_ctx(self, name: str, *args: Any) -> None:
        self.drv.call("cuCtxPushCurrent", self._ctx)
        try:
            self.drv.call(name, *args)
        finally:
            self.drv.call("cuCtxPopCurrent", ctypes.byref(ctypes.c_void_p()))

    def open(self, handle_hex: str) -> int:
        """Opens a daemon's IPC handle (128 hex digits); returns the device pointer."""
        raw = bytes.fromhex(handle_hex)
        if len(raw) != 64:
            raise ProtocolError(f"a CUDA IPC handle has 64 bytes, got {len(raw)}")
        ptr = ctypes.c_uint64()
        # 1 = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS, as cudaIpcOpenMemHandle is usually called.
        # from_buffer_copy: the structure's constructor would stop copying at a NUL byte.
        handle = IpcHandle.from_buffer_copy(raw)
        self._in_ctx("cuIpcOpenMemHandle", ctypes.byref(ptr), handle, 1)
        return ptr.value

    def close(self, ptr: int) -> None:
        self._in_ctx("cuIpcCloseMemHandle", ptr)

    def sync(self) -> None:
        """Waits for the work queued on the device's current stream."""
        self.torch.cuda.current_stream(self.device).synchronize()

    def release(self) -> None:
        self.drv.call("cuDevicePrimaryCtxRelease", self._cu_device)


class DevicePointer:
    """Presents a raw device pointer to torch as a 1-D uint8 array (__cuda_array_interface__)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "strides": None, "version": 2}
