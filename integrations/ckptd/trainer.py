"""Push a trainer's tensors into ckptd as a new checkpoint version.

Needs only the standard library and torch. Four ways, same result (name@N, pinned, hashed):

  StagingArea(url, name, tensors)    the daemon lays out a file for these tensors in its upload
    .write(tensors); .commit()       directory; they are written straight into it (mapped
                                     here) and each commit copies it into pooled pinned memory:
                                     the fast path for a loop that pushes every step
  push_cuda(url, name, tensors)      GPU tensors by CUDA IPC: the daemon copies them device to
                                     host itself, hashing as they land
  push_http(url, name, tensors)      streams each tensor's raw bytes over HTTP
  push_shm(url, name, tensors)       writes one safetensors file to /dev/shm, and the daemon
                                     adopts it (pins it in place, deletes it when the version
                                     is dropped): no copy through HTTP

Both take `token=`, an admin token of the daemon; without one, the first admin token of
the daemon's default tokens file (~/.local/state/ckptd/tokens) is used when it is readable.

    python3 -m ckptd.trainer http://127.0.0.1:8470 demo [http|shm|staged] [TOKENS_FILE]
    (or `ckptd-push ...` once installed; `python3 integrations/trainer_push.py ...` from the
    repository)
"""
from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import mmap
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .dtypes import DTYPES as _NAMES

# torch dtype -> safetensors name, for the dtypes this torch has
DTYPES: dict[torch.dtype, str] = {getattr(torch, attr): name for name, (attr, _) in _NAMES.items()
                                  if hasattr(torch, attr)}
Tensors = Mapping[str, torch.Tensor]


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes, without numpy (bf16 has no numpy type)."""
    t = t.detach().contiguous().cpu()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def token_from(path: str | None = None) -> str | None:
    """The first admin token of a tokens file (default: the daemon's default one), or None."""
    if path is None:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        path = os.path.join(state, "ckptd", "tokens")
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError:
        return None
    return next((line.split(":", 1)[1] for line in lines if line.startswith("admin:")), None)


def _call(method: str, url: str, body: dict[str, Any] | bytes | None = None,
          content_type: str = "application/json", token: str | None = None) -> Any:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"content-type": content_type}
    token = token or token_from()
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as res:
            return json.load(res)
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{method} {url}: {err.code} {err.read().decode()}") from None


def push_http(url: str, name: str, tensors: Tensors, token: str | None = None) -> Any:
    """Declares the tensors, PUTs each one's bytes, commits; returns the version summary."""
    decl = [{"name": k, "dtype": DTYPES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()]
    upload = _call("POST", f"{url}/v1/uploads", {"name": name, "tensors": decl}, token=token)
    for k, t in tensors.items():
        _call("PUT", f"{url}/v1/uploads/{upload['id']}/tensors/{urllib.parse.quote(k, safe='')}",
              _raw(t), "application/octet-stream", token=token)
    return _call("POST", f"{url}/v1/uploads/{upload['id']}/commit", {"wait": True}, token=token)


class StagingArea:
    """A staging area of the daemon (POST /v1/staging): the file it laid out for the declared
    tensors, mapped here. write() copies tensors into it (any device; the trainer may change
    them as soon as it returns), commit() makes the next version from it. Reuse it every step;
    close() (or a `with` block) deletes it. The file must be writable here: run as the daemon's
    user, or as a member of its uploadGroup."""

    def __init__(self, url: str, name: str, tensors: Tensors, token: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        decl = [{"name": k, "dtype": DTYPES[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()]
        body: dict[str, Any] = {"name": name, "tensors": decl}
        if metadata:
            body["metadata"] = dict(metadata)
        self.url, self.token = url, token
        self.info = _call("POST", f"{url}/v1/staging", body, token=token)
        self._places = {t["name"]: t for t in self.info["tensors"]}
        try:
            fd = os.open(self.info["path"], os.O_RDWR)
            try:
                self._map: mmap.mmap | None = mmap.mmap(fd, self.info["bytes"])
            finally:
                os.close(fd)
        except OSError:
            self._delete()
            raise

    def write(self, tensors: Tensors) -> None:
        """Copies each tensor into its place; one not declared, or of another dtype or shape, is
        a ValueError naming it (the tensors before it are written)."""
        if self._map is None:
            raise ValueError("the staging area is closed")
        for k, t in tensors.items():
            place = self._places.get(k)
            if place is None:
                raise ValueError(f"tensor {k!r} is not declared in staging area {self.info['id']}")
            if DTYPES.get(t.dtype) != place["dtype"] or list(t.shape) != place["shape"]:
                raise ValueError(f"tensor {k!r} is {DTYPES.get(t.dtype, t.dtype)} {list(t.shape)}, "
                                 f"declared {place['dtype']} {place['shape']}")
            if t.numel() == 0:
                continue
            dst = torch.frombuffer(self._map, dtype=t.dtype, count=t.numel(), offset=place["offset"])
            dst.copy_(t.detach().reshape(-1))
            del dst  # the mapping can be closed only once no tensor views it

    def commit(self) -> Any:
        """Makes the next version of the checkpoint from what was written; returns its summary."""
        return _call("POST", f"{self.url}/v1/staging/{self.info['id']}/commit", {}, token=self.token)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            self._delete()

    def _delete(self) -> None:
        _call("DELETE", f"{self.url}/v1/staging/{self.info['id']}", token=self.token)

    def __enter__(self) -> StagingArea:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def push_staged(url: str, name: str, tensors: Tensors, token: str | None = None) -> Any:
    """One push through a staging area made for it (a loop keeps a StagingArea instead)."""
    with StagingArea(url, name, tensors, token=token) as area:
        area.write(tensors)
        return area.commit()


class HostDeviceMemory:
    """Stand-in device memory for a daemon on the host backend (tests, CI, machines without a
    GPU): a memfd mapped here. Tensors made by tensor() live in it, and push_cuda hands the
    daemon its handle (/proc/<pid>/fd/<n>, which the daemon opens as root or as this user).
    `device` is the daemon's device UUID ("HOST-..." in GET /v1/status)."""

    def __init__(self, nbytes: int, device: str) -> None:
        self.device, self.nbytes = device, nbytes
        self.fd = os.memfd_create("ckptd-push", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, nbytes)
        # The daemon takes only a memfd sealed at its size: none can shrink it under its copies.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self._map = mmap.mmap(self.fd, nbytes)
        self._used = 0
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def tensor(self, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """A new tensor in this memory (zeros), 256-byte aligned."""
        n = torch.Size(shape).numel()
        size = n * torch.empty(0, dtype=dtype).element_size()
        at = -(-self._used // 256) * 256
        if at + size > self.nbytes:
            raise ValueError(f"{size} more bytes do not fit in {self.nbytes - at} left")
        self._used = at + size
        if n == 0:
            return torch.empty(shape, dtype=dtype)  # no bytes: push_cuda needs no memory for it
        return torch.frombuffer(self._map, dtype=dtype, count=n, offset=at).view(shape)

    def handle(self) -> dict[str, Any]:
        path = f"/proc/{os.getpid()}/fd/{self.fd}".encode() + b"\0"
        return {"kind": "host", "device": self.device, "len": self.nbytes, "pid": os.getpid(),
                "handle": base64.b64encode(path).decode()}


def _cuda_driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    for f in ("cuMemGetAddressRange_v2", "cuIpcGetMemHandle", "cuDeviceGet", "cuDeviceGetUuid"):
        getattr(lib, f).restype = ctypes.c_int
    return lib


def _cuda_buffer(drv: ctypes.CDLL, t: torch.Tensor) -> tuple[dict[str, Any], int]:
    """The CUDA IPC handle of the allocation holding t, as /v1/pushes takes it, and t's offset there."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(t.data_ptr()))
    handle = (ctypes.c_ubyte * 64)()
    rc = rc or drv.cuIpcGetMemHandle(handle, ctypes.c_uint64(base.value))
    dev, uuid = ctypes.c_int(), (ctypes.c_ubyte * 16)()
    rc = rc or drv.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(t.device.index or 0))
    rc = rc or drv.cuDeviceGetUuid(uuid, dev)
    if rc:
        raise RuntimeError(f"CUDA driver error {rc} while sharing a tensor on {t.device}")
    u = bytes(uuid).hex()
    name = f"GPU-{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    return ({"kind": "cuda", "device": name, "len": size.value, "pid": os.getpid(),
             "handle": base64.b64encode(bytes(handle)).decode()}, t.data_ptr() - base.value)


def push_cuda(url: str, name: str, tensors: Tensors, token: str | None = None,
              memory: Sequence[HostDeviceMemory] = (), metadata: Mapping[str, str] | None = None,
              part: tuple[int, int, str] | None = None, wait_ms: int | None = None,
              base: str | None = None) -> Any:
    """Pushes GPU tensors (CUDA IPC: the daemon copies them device-to-host itself, into pooled
    pinned memory) as the next version; returns its summary. The tensors may change once this
    returns. Tensors in one of `memory` (HostDeviceMemory) go the same way to a host-backend
    daemon. A tensor neither on a GPU nor in `memory`, or not contiguous, is a ValueError naming it.

    A sharded trainer (one process per GPU, each with part of the tensors) pushes one version
    together: each rank passes part=(its index, the number of ranks, an id the ranks share for
    this step, e.g. f"step-{step}"); every rank's call returns once the whole version is ready,
    or raises when a part did not come within wait_ms (default 60 s) and nothing was registered.

    base="name@N" pushes only what changed: the new version is that one with these tensors in
    place of its own (same dtype and shape), the daemon copying the others from its memory."""
    buffers: list[dict[str, Any]] = []
    index: dict[tuple[str, str], int] = {}
    decl = []
    drv = None
    for k, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"tensor {k!r} is not contiguous")
        if t.numel() == 0:  # no bytes to copy: any buffer holds it (the first, below)
            decl.append({"name": k, "dtype": DTYPES[t.dtype], "shape": list(t.shape), "buffer": 0, "offset": 0})
            continue
        ptr = t.data_ptr()
        home = next((m for m in memory if m.base <= ptr < m.base + m.nbytes), None)
        if home is not None:
            buf, offset = home.handle(), ptr - home.base
        elif t.is_cuda:
            drv = drv or _cuda_driver()
            buf, offset = _cuda_buffer(drv, t)
        else:
            raise ValueError(f"tensor {k!r} is on {t.device}, not in device memory (use a StagingArea)")
        key = (buf["device"], buf["handle"])
        if key not in index:
            index[key] = len(buffers)
            buffers.append(buf)
        decl.append({"name": k, "dtype": DTYPES[t.dtype], "shape": list(t.shape),
                     "buffer": index[key], "offset": offset})
    if not buffers:
        raise ValueError("no tensor has any bytes: nothing to push")
    for dev in {t.device for t in tensors.values() if t.is_cuda}:
        torch.cuda.synchronize(dev)  # what the trainer queued on its streams is in place, on every GPU
    body: dict[str, Any] = {"name": name, "buffers": buffers, "tensors": decl}
    if metadata:
        body["metadata"] = dict(metadata)
    if base is not None:
        body["base"] = base
    if part is not None:
        body["part"] = {"index": part[0], "of": part[1], "id": part[2]}
        if wait_ms is not None:
            body["part"]["waitMs"] = wait_ms
    return _call("POST", f"{url}/v1/pushes", body, token=token)


def write_safetensors(path: str, tensors: Tensors) -> None:
    """A safetensors file: 8-byte header length, JSON header, tensor bytes back to back."""
    header: dict[str, Any] = {}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(_raw(t))


def push_shm(url: str, name: str, tensors: Tensors, shm_dir: str = "/dev/shm", token: str | None = None) -> Any:
    """Writes the tensors to a file in shared memory and has the daemon adopt it."""
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".safetensors", dir=shm_dir)
    os.close(fd)
    try:
        write_safetensors(path, tensors)
        return _call("POST", f"{url}/v1/checkpoints", {"name": name, "files": [path], "adopt": True}, token=token)
    except Exception:
        os.unlink(path)  # not adopted: ours to clean up
        raise


def main(argv: list[str] | None = None) -> None:
    """Pushes a small demo checkpoint: URL NAME [http|shm|staged] [TOKENS_FILE]."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or len(args) > 4 or (len(args) > 2 and args[2] not in ("http", "shm", "staged")):
        sys.exit("usage: ckptd-push URL NAME [http|shm|staged] [TOKENS_FILE]")
    url, name = args[0], args[1]
    how = args[2] if len(args) > 2 else "shm"
    token = token_from(args[3] if len(args) > 3 else None)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(1000, 64, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(64),
    }
    push = {"http": push_http, "shm": push_shm, "staged": push_staged}[how]
    print(json.dumps(push(url, name, tensors, token=token)))


if __name__ == "__main__":
    main()
