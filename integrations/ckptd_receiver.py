"""The engine side of ckptd: receive weight updates from the daemon of this host.

Needs only the standard library, and torch for real engines. One Receiver per GPU process:

    r = Receiver("/run/ckptd/gpu-0.sock", device="cuda:0", name="engine-0")
    params = dict(model.named_parameters())
    summary = r.receive(apply_to_params(params))   # one update; r.serve(...) loops

The protocol is integrations/PROTOCOL.md: JSON lines over a Unix socket, tensor bytes in the
daemon's bucket buffers ("slots"), which the receiver maps once and keeps mapped until the
daemon announces a new generation of buffers or the receiver is closed.

Buffer lifetime, the one rule that matters: a view handed to `apply` points into a slot the
daemon overwrites as soon as it sees the bucket's ack. So `apply` must copy what it needs and
must not keep the views; the receiver waits for the engine's device copies to complete
(current CUDA stream of the device) before it acks.
"""
import collections
import ctypes
import json
import logging
import math
import mmap
import os
import socket
import time
import traceback
import warnings

PROTOCOL = 1
log = logging.getLogger("ckptd.receiver")


class ProtocolError(RuntimeError):
    """The daemon said something this receiver does not understand."""


class ReceiveError(RuntimeError):
    """Applying an update failed here; the daemon was told and the update was dropped."""

    def __init__(self, message, update=None, bucket=None):
        super().__init__(message)
        self.update = update
        self.bucket = bucket


class UpdateAborted(RuntimeError):
    """The daemon aborted the update (it failed elsewhere); the engine may hold part of it."""

    def __init__(self, update, reason):
        super().__init__(f"update {update} aborted: {reason}")
        self.update = update
        self.reason = reason


# ---- dtypes ---------------------------------------------------------------------------------

# safetensors name -> (torch attribute, bytes per element)
DTYPES = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4),
    "F64": ("float64", 8), "I8": ("int8", 1), "I16": ("int16", 2), "I32": ("int32", 4),
    "I64": ("int64", 8), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def _dtype_entry(name):
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} is not supported by the ckptd receiver "
                         f"(supported: {', '.join(DTYPES)})") from None


def dtype_size(name):
    """Bytes per element of a safetensors dtype name."""
    return _dtype_entry(name)[1]


def torch_dtype(name):
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch
    attr = _dtype_entry(name)[0]
    if not hasattr(torch, attr):
        raise ValueError(f"dtype {name!r} needs torch.{attr}, which this torch lacks")
    return getattr(torch, attr)


def _import_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _piece(t):
    """(begin, end) of the tensor's bytes that this entry holds: the whole tensor by default."""
    r = t.get("range")
    if r is None:
        return 0, t["bytes"]
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
            and 0 <= r[0] <= r[1] <= t["bytes"]):
        raise ProtocolError(f"tensor {t.get('name')}: range {r} is not within [0, {t['bytes']}]")
    return r[0], r[1]


def _check_tensor(t, slot_bytes):
    """Validates one tensor entry of a bucket against its slot; returns the bytes it holds."""
    name, shape, offset, nbytes = t.get("name"), t.get("shape"), t.get("offset"), t.get("bytes")
    if not isinstance(name, str) or not isinstance(shape, list) or \
            not isinstance(offset, int) or not isinstance(nbytes, int):
        raise ProtocolError(f"malformed tensor entry: {t}")
    size = dtype_size(t.get("dtype"))
    if nbytes != math.prod(shape) * size:
        raise ProtocolError(f"tensor {name}: {nbytes} bytes, but shape {shape} of "
                            f"{t['dtype']} takes {math.prod(shape) * size}")
    begin, end = _piece(t)
    if offset < 0 or offset + end - begin > slot_bytes:
        raise ProtocolError(f"tensor {name}: bytes [{offset}, {offset + end - begin}) outside "
                            f"the slot's {slot_bytes} bytes")
    return end - begin


def _typed_view(base, t):
    """The tensor `t` of a slot whose bytes are `base`: a typed torch view, or raw bytes.
    A piece of a split tensor is always raw bytes (it has no shape of its own)."""
    begin, end = _piece(t)
    raw = base[t["offset"]:t["offset"] + end - begin]
    if end - begin != t["bytes"]:
        return raw
    if isinstance(raw, memoryview):  # no torch: the engine gets the bytes (dtype/shape are its)
        return raw
    if t["offset"] % dtype_size(t["dtype"]):
        raise ProtocolError(f"tensor {t['name']}: offset {t['offset']} is not aligned to "
                            f"its {t['dtype']} elements")
    return raw.view(torch_dtype(t["dtype"])).view(tuple(t["shape"]))


# ---- mapping the daemon's slots -----------------------------------------------------------

class HostSlot:
    """A host-backend slot: the daemon's memfd (a /proc/<pid>/fd/<n> path), mapped read-only
    and shared, so the daemon's writes are seen without a copy."""

    def __init__(self, desc, torch=None):
        self.bytes = desc["bytes"]
        fd = os.open(desc["path"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(fd, self.bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the memfd alive
        if torch is None:
            self._base = memoryview(self._mm)
        else:
            with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is
                warnings.simplefilter("ignore")
                self._base = torch.frombuffer(self._mm, dtype=torch.uint8)

    def view(self, t):
        return _typed_view(self._base, t)

    def close(self):
        if isinstance(self._base, memoryview):
            self._base.release()
        self._base = None
        try:
            self._mm.close()
        except BufferError:
            # The engine kept a view past its ack (against the contract): leave the unmapping
            # to the garbage collector rather than pull the pages from under it.
            log.warning("a view of a host slot is still referenced; unmapping it later")


class _CudaDriver:
    """The few CUDA driver calls needed to open the daemon's IPC handles (libcuda.so.1).

    The driver API with an explicit primary context is used rather than the runtime, so the
    handle opens in the context torch uses for that device, whatever is current on this thread
    and whichever libcudart copy torch bundles."""

    class IpcHandle(ctypes.Structure):  # CUipcMemHandle, passed by value
        _fields_ = [("reserved", ctypes.c_char * 64)]

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        c_int, c_uint, c_void_p, c_u64, P = (ctypes.c_int, ctypes.c_uint, ctypes.c_void_p,
                                             ctypes.c_uint64, ctypes.POINTER)
        self.fn = {}
        for name, args in [
            ("cuInit", [c_uint]),
            ("cuDeviceGetCount", [P(c_int)]),
            ("cuDeviceGet", [P(c_int), c_int]),
            ("cuDeviceGetUuid_v2|cuDeviceGetUuid", [c_void_p, c_int]),
            ("cuDevicePrimaryCtxRetain", [P(c_void_p), c_int]),
            ("cuDevicePrimaryCtxRelease_v2|cuDevicePrimaryCtxRelease", [c_int]),
            ("cuCtxPushCurrent_v2", [c_void_p]),
            ("cuCtxPopCurrent_v2", [P(c_void_p)]),
            ("cuIpcOpenMemHandle_v2|cuIpcOpenMemHandle", [P(c_u64), self.IpcHandle, c_uint]),
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

    def call(self, name, *args):
        rc = self.fn[name](*args)
        if rc != 0:
            s = ctypes.c_char_p()
            self.fn["cuGetErrorName"](rc, ctypes.byref(s))
            raise RuntimeError(f"{name} failed: {(s.value or b'?').decode()} ({rc})")

    def uuid(self, ordinal):
        dev, raw = ctypes.c_int(), (ctypes.c_char * 16)()
        self.call("cuDeviceGet", ctypes.byref(dev), ordinal)
        self.call("cuDeviceGetUuid", ctypes.byref(raw), dev.value)
        return bytes(raw).hex()

    def count(self):
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return n.value


def _uuid_hex(uuid):
    """"GPU-xxxxxxxx-xxxx-..." (the daemon's form) -> 32 lowercase hex digits."""
    u = str(uuid).lower().removeprefix("gpu-")
    return "".join(c for c in u if c in "0123456789abcdef")


class _CudaDevice:
    """This process's view of the daemon's GPU: its ordinal here, its primary context, and
    the IPC mappings opened in it."""

    def __init__(self, torch, device, uuid):
        self.torch = torch
        self.drv = _CudaDriver()
        want = _uuid_hex(uuid)
        if device is None:
            # Find the daemon's GPU among the visible ones by UUID: robust to any
            # CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER difference between daemon and engine.
            found = [i for i in range(self.drv.count()) if self.drv.uuid(i) == want]
            if not found:
                raise RuntimeError(f"the daemon's GPU {uuid} is not visible to this process "
                                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
            self.index = found[0]
        else:
            d = torch.device(device)
            self.index = d.index if d.index is not None else torch.cuda.current_device()
            if want and self.drv.uuid(self.index) != want:
                raise RuntimeError(f"this socket serves GPU {uuid}, but cuda:{self.index} here is "
                                   f"GPU-{self.drv.uuid(self.index)}: wrong socket for this device "
                                   f"(check CUDA_VISIBLE_DEVICES)")
        self.device = torch.device("cuda", self.index)
        torch.zeros(1, device=self.device)  # torch's context for the device exists (README)
        dev = ctypes.c_int()
        self.drv.call("cuDeviceGet", ctypes.byref(dev), self.index)
        self._cu_device = dev.value
        self._ctx = ctypes.c_void_p()
        self.drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(self._ctx), self._cu_device)

    def _in_ctx(self, name, *args):
        self.drv.call("cuCtxPushCurrent", self._ctx)
        try:
            self.drv.call(name, *args)
        finally:
            self.drv.call("cuCtxPopCurrent", ctypes.byref(ctypes.c_void_p()))

    def open(self, handle_hex):
        raw = bytes.fromhex(handle_hex)
        if len(raw) != 64:
            raise ProtocolError(f"a CUDA IPC handle has 64 bytes, got {len(raw)}")
        ptr = ctypes.c_uint64()
        # 1 = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS, as cudaIpcOpenMemHandle is usually called.
        # from_buffer_copy: the structure's constructor would stop copying at a NUL byte.
        handle = _CudaDriver.IpcHandle.from_buffer_copy(raw)
        self._in_ctx("cuIpcOpenMemHandle", ctypes.byref(ptr), handle, 1)
        return ptr.value

    def close(self, ptr):
        self._in_ctx("cuIpcCloseMemHandle", ptr)

    def sync(self):
        self.torch.cuda.current_stream(self.device).synchronize()

    def release(self):
        self.drv.call("cuDevicePrimaryCtxRelease", self._cu_device)


class _DevicePointer:
    """Presents a raw device pointer to torch as a 1-D uint8 array (__cuda_array_interface__)."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "strides": None, "version": 2}


class CudaSlot:
    """A CUDA slot: the daemon's device buffer opened from its IPC handle, as one uint8 tensor
    that per-tensor views slice. Opened once per buffers generation, because opening an IPC
    handle costs far more than slicing."""

    def __init__(self, desc, dev):
        self.bytes, self._dev = desc["bytes"], dev
        self._ptr = dev.open(desc["handle"])
        self._base = dev.torch.as_tensor(_DevicePointer(self._ptr, self.bytes), device=dev.device)

    def view(self, t):
        return _typed_view(self._base, t)

    def close(self):
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

    def __init__(self, device=None, use_torch=None):
        self.device = device
        self._torch = _import_torch() if use_torch is not False else None
        if use_torch and self._torch is None:
            raise ImportError("use_torch=True, but torch cannot be imported")
        self._cuda = None

    def map(self, desc, welcome):
        kind = desc.get("kind")
        if kind == "host":
            return HostSlot(desc, self._torch)
        if kind == "cuda":
            if self._torch is None:
                raise RuntimeError("CUDA slots need torch")
            if self._cuda is None:
                self._cuda = _CudaDevice(self._torch, self.device, welcome.get("uuid", ""))
            return CudaSlot(desc, self._cuda)
        raise ProtocolError(f"slot {desc.get('slot')}: unknown kind {kind!r}")

    def staging(self, nbytes, like):
        """Memory for assembling a tensor larger than a bucket, where its pieces live."""
        torch = self._torch
        if torch is not None and isinstance(like, torch.Tensor):
            return torch.empty(nbytes, dtype=torch.uint8, device=like.device)
        return bytearray(nbytes)

    def sync(self):
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

    def close(self):
        """Releases the CUDA context reference taken to open handles (after the slots closed)."""
        if self._cuda is not None:
            self._cuda.release()
            self._cuda = None


# ---- the receiver ---------------------------------------------------------------------------

def _describe(exc):
    return f"{type(exc).__name__}: {exc}"[:4000]


class Receiver:
    """One engine process's connection to the daemon's socket for one GPU.

    socket_path: `<socketDir>/gpu-<index>.sock`. device: the engine's torch device (see
    Mapper). name: how the daemon names this receiver in logs and errors. timeout: seconds
    to wait for each message from the daemon (None: forever); on expiry, TimeoutError (or a
    ReceiveError during an update). mapper: see Mapper; the default suits engines.
    """

    def __init__(self, socket_path, device=None, name=None, timeout=None, mapper=None):
        self.socket_path = socket_path
        self.name = name or f"engine-{os.getpid()}"
        self._mapper = mapper if mapper is not None else Mapper(device)
        self._rbuf = bytearray()
        self._pending = collections.deque()   # messages read ahead (a begin seen while draining)
        self._assembled = {}  # name -> [staging, bytes received, total] of split tensors
        self._closed = collections.deque(maxlen=256)  # updates finished/failed here: late
        self._slots = {}                               # messages about them are ignored
        self.generation = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_path)
            self._send(op="hello", protocol=PROTOCOL, pid=os.getpid(), name=self.name)
            self.welcome = self._read()
            if self.welcome.get("op") != "welcome" or self.welcome.get("protocol") != PROTOCOL:
                raise ProtocolError(f"expected a welcome for protocol {PROTOCOL}, got {self.welcome}")
            first = self._read()
            if first.get("op") != "buffers":
                raise ProtocolError(f"expected buffers after welcome, got {first}")
            self._map(first)
        except BaseException:
            self.close()
            raise

    # -- socket ---------------------------------------------------------------------------

    def _send(self, **msg):
        self._sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def _read(self):
        while True:
            i = self._rbuf.find(b"\n")
            if i >= 0:
                line = bytes(self._rbuf[:i])
                del self._rbuf[:i + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise ProtocolError(f"not JSON from the daemon: {line[:200]!r}") from e
                if not isinstance(msg, dict):
                    raise ProtocolError(f"not a JSON object from the daemon: {line[:200]!r}")
                return msg
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"the daemon closed {self.socket_path}")
            self._rbuf += chunk

    def _next(self):
        """The next message other than `buffers`, which is handled here whenever it comes."""
        while True:
            msg = self._pending.popleft() if self._pending else self._read()
            if msg.get("op") != "buffers":
                return msg
            self._map(msg)

    # -- buffers ----------------------------------------------------------------------------

    def _map(self, msg):
        # Old mappings go first: every bucket of them was acked, so no copy reads them, and the
        # daemon may re-announce the same CUDA handle, which cannot be opened twice.
        self._unmap()
        slots = {}
        try:
            for desc in msg.get("slots", []):
                slots[desc["slot"]] = self._mapper.map(desc, self.welcome)
        except BaseException:
            for s in slots.values():
                s.close()
            raise
        self._slots, self.generation = slots, msg.get("generation")
        log.info("mapped buffers generation %s: %d slots", self.generation, len(slots))

    def _unmap(self):
        slots, self._slots = self._slots, {}
        for s in slots.values():
            s.close()

    # -- updates ----------------------------------------------------------------------------

    def receive(self, apply, finish=None):
        """Processes exactly one update and returns its summary.

        apply(batch): batch is a list of (name, view) for one bucket; the views are valid only
        during the call, copies into the engine must be queued on the current CUDA stream (or
        be complete) when it returns. It may return the names it did not use (reported as
        "unknown"). finish(): runs after the last bucket, before `done`.
        Raises UpdateAborted (daemon abort), ReceiveError (apply/finish failed here; the
        daemon was told), ProtocolError, ConnectionError, TimeoutError.
        """
        msg = self._wait_begin()
        update, t0 = msg["update"], time.perf_counter()
        self._assembled = {}
        summary = {"update": update, "checkpoint": msg.get("checkpoint"), "buckets": 0,
                   "tensors": 0, "bytes": 0, "seconds": 0.0, "apply_seconds": 0.0, "unknown": []}
        expected = (msg.get("buckets"), msg.get("tensors"))
        while True:
            try:
                msg = self._next()
            except ConnectionError:
                raise
            except Exception as e:  # noqa: BLE001 - a timeout, or buffers that failed to map
                self._fail(update, None, e, drain=not isinstance(e, TimeoutError))
            op = msg.get("op")
            if op == "begin":  # the daemon moved on without an end or abort for this update
                self._pending.appendleft(msg)
                self._fail(update, None, ProtocolError(
                    f"update {msg.get('update')} began before update {update} ended"), drain=False)
            if msg.get("update") != update:
                if msg.get("update") in self._closed and op in ("bucket", "end", "abort"):
                    continue
                self._fail(update, None, ProtocolError(f"unexpected during update {update}: {msg}"))
            elif op == "bucket":
                self._bucket(msg, apply, summary)
            elif op == "abort":
                self._closed.append(update)
                raise UpdateAborted(update, msg.get("reason", ""))
            elif op == "end":
                try:
                    got = (summary["buckets"], summary["tensors"])
                    if None not in expected and got != expected:
                        raise ProtocolError(f"begin announced {expected[0]} buckets and "
                                            f"{expected[1]} tensors, got {got[0]} and {got[1]}")
                    if finish is not None:
                        finish()
                except Exception as e:  # noqa: BLE001 - reported to the daemon, then raised
                    self._fail(update, None, e, drain=False)  # `end` was the last message
                self._send(op="done", update=update)
                self._closed.append(update)
                summary["seconds"] = time.perf_counter() - t0
                return summary
            else:
                self._fail(update, None, ProtocolError(f"unexpected during update {update}: {msg}"))

    def _wait_begin(self):
        while True:
            msg = self._next()
            op, update = msg.get("op"), msg.get("update")
            if op == "begin" and isinstance(update, str):
                return msg
            if op in ("bucket", "end", "abort") and update in self._closed:
                continue  # the tail of an update this receiver already gave up on
            if op == "abort":
                log.info("abort for update %s, which never began here", update)
                self._closed.append(update)
            elif op in ("bucket", "end"):
                # An update that began before this receiver connected: not ours to apply, but
                # the daemon must not wait for us, so say so.
                log.warning("%s for update %s without its begin; refusing it", op, update)
                self._send(op="error", update=update, message=f"receiver {self.name} "
                           f"connected after update {update} began")
                self._closed.append(update)
            else:
                raise ProtocolError(f"expected begin, got {msg}")

    def _bucket(self, msg, apply, summary):
        started = time.perf_counter()
        bucket = msg.get("bucket")
        try:
            slot = self._slots.get(msg.get("slot"))
            if slot is None:
                raise ProtocolError(f"bucket {bucket} is in slot {msg.get('slot')}, which buffers "
                                    f"generation {self.generation} does not have")
            nbytes = sum(_check_tensor(t, slot.bytes) for t in msg.get("tensors", []))
            batch = []
            for t in msg["tensors"]:
                view = slot.view(t)
                begin, end = _piece(t)
                if end - begin == t["bytes"]:
                    batch.append((t["name"], view))
                else:
                    whole = self._assemble(t, view, begin, end, apply)
                    if whole is not None:
                        batch.append((t["name"], whole))
            unknown = apply(batch)
            del batch  # the views die here: the slot is the daemon's again after the ack
            self._mapper.sync()
            # Assembled tensors were copied out by apply (synced above): free them now.
            self._assembled = {k: v for k, v in self._assembled.items() if v[1] < v[2]}
        except Exception as e:  # noqa: BLE001 - reported to the daemon, then raised
            # The traceback's frames would keep the views (and through them the slot) alive
            # after the update is dropped: clear their locals; file and line stay printable.
            batch = None  # noqa: F841 - this frame stays in the traceback too
            traceback.clear_frames(e.__traceback__)
            self._fail(msg.get("update"), bucket, e)
        self._send(op="ack", update=msg["update"], bucket=bucket)
        summary["apply_seconds"] += time.perf_counter() - started
        summary["buckets"] += 1
        summary["tensors"] += sum(1 for t in msg["tensors"] if _piece(t)[1] == t["bytes"])  # one per tensor
        summary["bytes"] += nbytes
        if unknown:
            summary["unknown"].extend(unknown)

    def _assemble(self, t, view, begin, end, apply):
        """One piece of a tensor larger than a bucket. If apply has a `piece(name, bytes_view,
        begin, total)` method, the piece goes straight to it (no extra memory); otherwise the
        pieces are gathered into a staging tensor, handed to apply whole once all its bytes
        arrived. Returns that whole tensor, or None."""
        name = t["name"]
        piece = getattr(apply, "piece", None)
        if piece is not None:
            piece(name, view, begin, t["bytes"])
            return None
        entry = self._assembled.get(name)
        if entry is None:
            staging = getattr(self._mapper, "staging", None)
            entry = [staging(t["bytes"], view) if staging else bytearray(t["bytes"]), 0, t["bytes"]]
            self._assembled[name] = entry
        # Pieces are disjoint and may arrive in any order (each GPU's buckets flow on their own).
        entry[0][begin:end] = view
        entry[1] += end - begin
        if entry[1] < t["bytes"]:
            return None
        staged = entry[0]
        if hasattr(staged, "view") and not isinstance(staged, (bytearray, memoryview)):
            return staged.view(torch_dtype(t["dtype"])).view(tuple(t["shape"]))
        return memoryview(staged)

    def _fail(self, update, bucket, exc, drain=True):
        """Tells the daemon, drops the rest of the update, raises ReceiveError."""
        msg = {"op": "error", "update": update, "message": _describe(exc)}
        if bucket is not None:
            msg["bucket"] = bucket
        log.error("update %s failed here (bucket %s): %s", update, bucket, msg["message"])
        try:
            self._send(**msg)
            if drain:
                self._drain(update)
        except Exception as e:  # noqa: BLE001 - daemon gone or silent: the error below says enough
            log.warning("while dropping update %s: %s", update, _describe(e))
        self._closed.append(update)
        raise ReceiveError(msg["message"], update, bucket) from exc

    def _drain(self, update):
        """Reads (without acking) what is left of a failed update, until the daemon's abort or
        end for it, so the next receive() starts clean. A begin of a later update also ends
        the drain (a daemon that does not abort the receiver that failed); it is kept."""
        while True:
            msg = self._next()
            if msg.get("op") in ("abort", "end") and msg.get("update") == update:
                return
            if msg.get("op") == "begin":
                self._pending.appendleft(msg)
                return

    def serve(self, apply, finish=None):
        """Receives updates forever; an aborted or failed update is logged and the next one
        awaited. Connection and protocol errors end it."""
        while True:
            try:
                s = self.receive(apply, finish)
                log.info("update %s (%s): %d tensors, %d bytes in %.3f s", s["update"],
                         s["checkpoint"], s["tensors"], s["bytes"], s["seconds"])
            except UpdateAborted as e:
                log.warning("%s", e)
            except ReceiveError as e:
                log.error("update %s failed here: %s", e.update, e)

    def close(self):
        """Unmaps the slots and closes the socket. Idempotent."""
        try:
            self._unmap()
            close = getattr(self._mapper, "close", None)
            if close is not None:
                close()
        finally:
            self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- helpers for engines --------------------------------------------------------------------

def apply_to_params(params, counts=None):
    """An `apply` that copies each received tensor into params[name] (a dict of tensors, e.g.
    dict(model.named_parameters())), on the current stream. Names not in params are returned
    (the receiver reports them as "unknown"), not an error. counts: an optional
    collections.Counter incremented per applied name."""

    def apply(batch):
        unknown = []
        for name, view in batch:
            p = params.get(name)
            if p is None:
                unknown.append(name)
                continue
            if tuple(p.shape) != tuple(view.shape):
                # copy_ would broadcast a smaller tensor silently
                raise ValueError(f"{name}: received shape {list(view.shape)}, "
                                 f"parameter has {list(p.shape)}")
            p.copy_(view, non_blocking=True)
            if counts is not None:
                counts[name] += 1
        return unknown

    def piece(name, view, begin, total):
        # A piece of a tensor larger than a bucket goes straight into place, as bytes.
        p = params.get(name)
        if p is None:
            return
        if p.numel() * p.element_size() != total or not p.is_contiguous():
            raise ValueError(f"{name}: a {total}-byte tensor cannot land in this parameter")
        flat = p.view(-1).view(view.dtype) if hasattr(view, "dtype") else None
        if flat is None:
            raise TypeError(f"{name}: pieces need torch views")
        flat[begin:begin + view.numel()].copy_(view, non_blocking=True)
        if counts is not None and begin + view.numel() == total:
            counts[name] += 1

    apply.piece = piece
    return apply


def physical_gpu_index(local_index, visible=None):
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


def gpu_socket_path(socket_dir, local_index):
    """`<socket_dir>/gpu-<physical index>.sock` for this process's CUDA device `local_index`."""
    return os.path.join(socket_dir, f"gpu-{physical_gpu_index(local_index)}.sock")
