"""GPU self-test of the receiver's CUDA path, for the GPU machine (needs torch and a GPU).

    python3 integrations/gpu_selftest.py [--layers 4] [--updates 3]
    (or python3 -m integrations.gpu_selftest from the repository root)

A stand-in daemon runs in another process (CUDA IPC handles cannot be opened by their
exporter): it allocates slots with cuMemAlloc, exports them with cuIpcGetMemHandle and speaks
PROTOCOL.md. Checks:
  dtypes  every dtype's bytes arrive exactly through CUDA views (device found by UUID), an
          abort is survived, and a new buffers generation is remapped;
  engine  torch_engine.py (the benchmark consumer) passes its checks on the q8b layout, and
          fails them when the stand-in corrupts one checked tensor.
Prints "N passed, N failed"; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if not __package__:  # run as a script
    sys.path.insert(0, os.path.dirname(HERE))

from integrations import ckptd as cr  # noqa: E402
from integrations import torch_engine  # noqa: E402
from integrations.ckptd.cuda import CudaDevice, DevicePointer, IpcHandle  # noqa: E402
from integrations.ckptd.receiver import Batch  # noqa: E402

Fill = Callable[[torch.Tensor], Any]

ALL_DTYPES = list(cr.DTYPES)


def dtype_tensors(seed: int, count: int = 24) -> list[tuple[str, str, list[int], bytes]]:
    """[(name, dtype, shape, bytes)]: random bytes of every dtype (as raw bytes, any bit
    pattern, NaNs included: the receiver must not care)."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        dt = ALL_DTYPES[i % len(ALL_DTYPES)]
        shape = [rnd.randint(1, 300), rnd.randint(1, 70)] if i % 5 else [rnd.randint(1, 9)]
        n = cr.dtype_size(dt) * shape[0] * (shape[1] if len(shape) > 1 else 1)
        out.append((f"t{seed}.{i}.{dt}", dt, shape, rnd.randbytes(n)))
    return out


# ---- the stand-in daemon (its own process) ------------------------------------------------

class StandIn:
    def __init__(self, sock_path: str, device: str = "cuda:0") -> None:
        torch.cuda.set_device(device)
        self.dev = CudaDevice(torch, device, "")
        lib = ctypes.CDLL("libcuda.so.1")
        P, u64 = ctypes.POINTER, ctypes.c_uint64
        for name, args in [("cuMemAlloc_v2", [P(u64), ctypes.c_size_t]),
                           ("cuIpcGetMemHandle", [P(IpcHandle), u64])]:
            f = getattr(lib, name)
            f.argtypes, f.restype = args, ctypes.c_int
            self.dev.drv.fn[name] = f
        u = self.dev.drv.uuid(self.dev.index)
        self.uuid = f"GPU-{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock_path)
        srv.listen(1)
        self.conn, _ = srv.accept()
        self.rfile = self.conn.makefile("rb")
        self.generation = 0
        self.slots: list[tuple[int, torch.Tensor]] = []
        self.old: list[tuple[int, torch.Tensor]] = []
        hello = self.recv()
        assert hello["op"] == "hello", hello
        self.send(op="welcome", protocol=1, gpu=self.dev.index, uuid=self.uuid, backend="cuda")

    def send(self, **msg: Any) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("receiver left")
        return json.loads(line)

    def recv_for(self, uid: str) -> dict[str, Any]:
        while True:  # late acks of an aborted update are skipped
            m = self.recv()
            if m.get("update") == uid:
                return m

    def wait_gone(self) -> None:
        try:
            while True:
                self.recv()
        except ConnectionError:
            pass

    def new_buffers(self, count: int, nbytes: int) -> None:
        # Earlier slots stay allocated (until exit): the protocol has no "unmapped" answer, so
        # nothing tells when a receiver has closed them.
        self.old += self.slots
        self.slots, descs = [], []
        for i in range(count):
            ptr, h = ctypes.c_uint64(), IpcHandle()
            self.dev._in_ctx("cuMemAlloc_v2", ctypes.byref(ptr), nbytes)
            self.dev._in_ctx("cuIpcGetMemHandle", ctypes.byref(h), ptr.value)
            t = torch.as_tensor(DevicePointer(ptr.value, nbytes), device=self.dev.device)
            t.fill_(0xEE)
            self.slots.append((ptr.value, t))
            descs.append({"slot": i, "bytes": nbytes, "kind": "cuda", "handle": bytes(h).hex()})
        self.generation += 1
        torch.cuda.synchronize()
        self.send(op="buffers", generation=self.generation, slots=descs)

    def update(self, uid: str, buckets: list[list[tuple[str, str, list[int], Fill]]],
               checkpoint: str = "selftest@1", abort_after: int | None = None) -> None:
        """buckets: lists of (name, dtype, shape, fill) where fill(uint8 cuda tensor) writes the
        tensor's bytes. A slot is rewritten only after the ack of its previous bucket."""
        n = len(self.slots)
        self.send(op="begin", update=uid, checkpoint=checkpoint,
                  tensors=sum(map(len, buckets)), buckets=len(buckets))
        acked = 0
        for b, tensors in enumerate(buckets):
            while acked <= b - n:
                m = self.recv_for(uid)
                assert m == {"op": "ack", "update": uid, "bucket": acked}, m
                acked += 1
            slot, entries, off = self.slots[b % n][1], [], 0
            for name, dtype, shape, fill in tensors:
                nb = cr.dtype_size(dtype) * torch.Size(shape).numel()
                fill(slot[off:off + nb])
                entries.append({"name": name, "dtype": dtype, "shape": shape, "offset": off,
                                "bytes": nb})
                off += -(-nb // 256) * 256
            torch.cuda.synchronize()  # "the bytes are complete on this GPU"
            self.send(op="bucket", update=uid, bucket=b, slot=b % n, tensors=entries)
            if abort_after == b:
                self.send(op="abort", update=uid, reason="stand-in aborts on purpose")
                return
        while acked < len(buckets):
            m = self.recv_for(uid)
            assert m == {"op": "ack", "update": uid, "bucket": acked}, m
            acked += 1
        self.send(op="end", update=uid)
        m = self.recv_for(uid)
        assert m == {"op": "done", "update": uid}, m


def pack(tensors: list[Any], slot_bytes: int) -> list[list[Any]]:
    buckets: list[list[Any]] = []
    cur: list[Any] = []
    used = 0
    for t in tensors:
        nb = -(-(cr.dtype_size(t[1]) * torch.Size(t[2]).numel()) // 256) * 256
        if cur and used + nb > slot_bytes:
            buckets.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += nb
    return buckets + [cur] if cur else buckets


def bytes_fill(data: bytes) -> Fill:
    return lambda dst: dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def standin_dtypes(sock: str) -> None:
    d = StandIn(sock)
    d.new_buffers(2, 256 << 10)
    for uid, seed, abort in (("u-1", 1, None), ("u-2", 2, 0)):
        ts = [(n, dt, s, bytes_fill(b)) for n, dt, s, b in dtype_tensors(seed)]
        d.update(uid, pack(ts, 256 << 10), abort_after=abort)
    d.new_buffers(3, 384 << 10)
    ts = [(n, dt, s, bytes_fill(b)) for n, dt, s, b in dtype_tensors(3)]
    d.update("u-3", pack(ts, 384 << 10))
    d.wait_gone()


def standin_q8b(sock: str, layers: int, updates: int, corrupt_last: bool) -> None:
    d = StandIn(sock)
    specs = list(torch_engine.layout(layers))
    slot_bytes = max(2 * torch.Size(s).numel() for _, s in specs)
    d.new_buffers(2, -(-slot_bytes // 256) * 256)

    def gen(i: int, shape: list[int], seed_shift: int = 0) -> Fill:
        def fill(dst: torch.Tensor) -> None:
            dst.view(torch.bfloat16).view(shape).copy_(torch_engine.expected(i + seed_shift, shape, "cuda"))
        return fill

    for u in range(updates):
        bad = corrupt_last and u == updates - 1
        ts = [(n, "BF16", s, gen(i, s, 1 if bad and i == 0 else 0)) for i, (n, s) in enumerate(specs)]
        d.update(f"u-{u + 1}", pack(ts, d.slots[0][1].numel()), checkpoint=f"q8b@{u + 1}")
    d.wait_gone()


# ---- the checks ---------------------------------------------------------------------------

def start_standin(tmp: str, *args: object) -> tuple[str, subprocess.Popen[bytes]]:
    sock = os.path.join(tmp, "gpu-0.sock")
    p = subprocess.Popen([sys.executable, __file__, "--standin", sock, *map(str, args)])
    for _ in range(600):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.05)
    return sock, p


def check_dtypes(tmp: str) -> str:
    sock, p = start_standin(tmp, "dtypes")
    try:
        got: dict[str, Any] = {}

        def apply(batch: Batch) -> None:
            for name, t in batch:
                assert isinstance(t, torch.Tensor) and t.is_cuda and t.device.index == torch.cuda.current_device(), name
                got[name] = (t.dtype, list(t.shape), bytes(t.view(torch.uint8).cpu().flatten().tolist()))

        r = cr.Receiver(sock, timeout=60, name="selftest")  # device found by the GPU's UUID
        s1 = r.receive(apply)
        want = {n: (cr.torch_dtype(dt), s, b) for n, dt, s, b in dtype_tensors(1)}
        assert got == want, "u-1: bytes differ"
        assert s1["tensors"] == len(want) and s1["buckets"] > 1, s1
        try:
            r.receive(apply)
            raise AssertionError("u-2 was not aborted")
        except cr.UpdateAborted as e:
            assert e.update == "u-2", e
        got.clear()
        r.receive(apply)
        want = {n: (cr.torch_dtype(dt), s, b) for n, dt, s, b in dtype_tensors(3)}
        assert got == want, "u-3 (after remap): bytes differ"
        assert r.generation == 2, r.generation
        r.close()
        return f"{len(ALL_DTYPES)} dtypes, {s1['buckets']} buckets, abort, remap"
    finally:
        p.wait(timeout=60)


def check_engine(tmp: str, layers: int, updates: int) -> str:
    sock, p = start_standin(tmp, "q8b", layers, updates + 1, 1)
    try:
        e = subprocess.run([sys.executable, os.path.join(HERE, "torch_engine.py"), "--socket", sock,
                            "--device", "cuda:0", "--layers", str(layers),
                            "--updates", str(updates + 1), "--timeout", "300"],
                           capture_output=True, text=True, timeout=540)
        lines = [json.loads(x) for x in e.stdout.splitlines() if x.startswith("{")]
        for x in lines:
            print("   ", json.dumps(x))
        assert len(lines) == updates + 1, e.stderr[-3000:]
        assert all(x["ok"] for x in lines[:-1]), "an honest update failed the check"
        last = lines[-1]
        assert not last["ok"] and last["mismatched"] == ["model.embed_tokens.weight"], last
        assert e.returncode == 1, e.returncode
        gbs = [x["bytes"] / x["seconds"] / 1e9 for x in lines[:-1]]
        return f"{updates} updates ok, corrupted one caught; {lines[0]['checked']} checked"\
               f" per update (stand-in-bound {min(gbs):.1f}-{max(gbs):.1f} GB/s)"
    finally:
        p.wait(timeout=60)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--standin":
        sock, kind, *rest = sys.argv[2:]
        return standin_dtypes(sock) if kind == "dtypes" else \
            standin_q8b(sock, int(rest[0]), int(rest[1]), rest[2] == "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3)
    args = ap.parse_args()
    passed = failed = 0
    for name, fn, fargs in (("dtypes", check_dtypes, ()),
                            ("engine", check_engine, (args.layers, args.updates))):
        with tempfile.TemporaryDirectory(prefix="ckptd-gpu-") as tmp:
            try:
                print(f"ok   {name}: {fn(tmp, *fargs)}", flush=True)
                passed += 1
            except Exception:  # noqa: BLE001 - reported, then counted
                print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
                failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
