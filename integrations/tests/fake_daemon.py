"""What the engine side's tests share: a fake daemon speaking PROTOCOL.md over a real Unix
socket from a thread, with "host" slots backed by temp files that the receiver maps; it writes
each bucket's bytes into its slot before announcing it, reusing a slot only after its ack, as
the daemon does. Also random buckets, a recording `apply`, and the torch switch.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import unittest

from integrations import ckptd as cr

TIMEOUT = 10

def host_mapper():
    """The real mapper, with memoryview views whether or not torch is installed."""
    return cr.Mapper(use_torch=False)


class FakeDaemon:
    """The daemon side of one connection; `script(daemon)` runs in a thread after the
    handshake. Exceptions in the thread are raised again by join()."""

    def __init__(self, slots=2, slot_bytes=4096):
        self.dir = tempfile.mkdtemp(prefix="ckptd-test-")
        self.path = os.path.join(self.dir, "gpu-0.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.server.settimeout(TIMEOUT)
        self.generation = 0
        self.buffers = self.new_buffers(slots, slot_bytes)
        self.hello = None
        self.received = []  # every message from the receiver, in order
        self.sent = []
        self.error = None
        self.conn = None
        self._rbuf = b""

    def new_buffers(self, slots, slot_bytes):
        """A new generation of slots: fresh zeroed files. Returns the `buffers` message."""
        self.generation += 1
        self.slot_files = []
        for i in range(slots):
            f = os.path.join(self.dir, f"gen{self.generation}-slot{i}")
            with open(f, "wb") as fh:
                fh.truncate(slot_bytes)
            self.slot_files.append(f)
        self.slot_bytes = slot_bytes
        return {"op": "buffers", "generation": self.generation, "slots": [
            {"slot": i, "bytes": slot_bytes, "kind": "host", "path": f}
            for i, f in enumerate(self.slot_files)]}

    def start(self, script, welcome=None):
        def run():
            try:
                self.conn, _ = self.server.accept()
                self.conn.settimeout(TIMEOUT)
                self.hello = self.recv()
                self.send(welcome or {"op": "welcome", "protocol": 1, "gpu": 0,
                                      "uuid": "HOST-test-0", "backend": "host"})
                self.send(self.buffers)
                script(self)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def join(self):
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError("fake daemon did not finish")
        if self.error:
            raise self.error

    def close(self):
        for s in (self.conn, self.server):
            if s is not None:
                s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, msg):
        self.sent.append(msg)
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self):
        while b"\n" not in self._rbuf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError("receiver closed the socket")
            self._rbuf += chunk
        line, self._rbuf = self._rbuf.split(b"\n", 1)
        msg = json.loads(line)
        self.received.append(msg)
        return msg

    def recv_for(self, update):
        """The next message about `update` (late acks of an aborted update are skipped)."""
        while True:
            msg = self.recv()
            if msg.get("update") == update:
                return msg

    def write_bucket(self, update, bucket, slot, tensors):
        """Writes the tensors' bytes into the slot file, returns the `bucket` message."""
        entries, offset = [], 0
        with open(self.slot_files[slot], "r+b") as f:
            for name, dtype, shape, data in tensors:
                f.seek(offset)
                f.write(data)
                entries.append({"name": name, "dtype": dtype, "shape": shape,
                                "offset": offset, "bytes": len(data)})
                offset += -(-len(data) // 64) * 64  # 64-byte aligned, as a daemon might
        assert offset <= self.slot_bytes
        return {"op": "bucket", "update": update, "bucket": bucket, "slot": slot,
                "tensors": entries}

    def push(self, update, buckets, checkpoint="test@1", stop_after=None):
        """Runs one update: begin, the buckets through the slots (a slot is rewritten only
        after its ack), end; returns the acks. stop_after=k: send buckets 0..k only and
        return (the script goes on by hand)."""
        n = len(self.slot_files)
        self.send({"op": "begin", "update": update, "checkpoint": checkpoint,
                   "tensors": sum(len(b) for b in buckets), "buckets": len(buckets)})
        acks = []
        for b, tensors in enumerate(buckets):
            if b >= n:
                acks.append(self.recv_for(update))
                assert acks[-1] == {"op": "ack", "update": update, "bucket": b - n}, acks[-1]
            self.send(self.write_bucket(update, b, b % n, tensors))
            if stop_after == b:
                return acks
        while len(acks) < len(buckets):
            acks.append(self.recv_for(update))
        self.send({"op": "end", "update": update})
        acks.append(self.recv_for(update))
        return acks


ALL_DTYPES = ("BF16", "F32", "I64", "U8", "F8_E4M3", "BOOL")


def make_buckets(seed, sizes=(3, 1, 4, 2, 3), dtypes=ALL_DTYPES):
    """Buckets of random tensors of several dtypes: [(name, dtype, shape, bytes), ...]."""
    rnd = random.Random(seed)
    dtypes = [(d, cr.dtype_size(d)) for d in dtypes]
    buckets, i = [], 0
    for n in sizes:
        bucket = []
        for _ in range(n):
            dtype, size = rnd.choice(dtypes)
            shape = [rnd.randint(1, 8), rnd.randint(1, 12)]
            data = rnd.randbytes(shape[0] * shape[1] * size)
            bucket.append((f"layers.{i}.weight", dtype, shape, data))
            i += 1
        buckets.append(bucket)
    return buckets


class Recorder:
    """An apply that copies every view's bytes at once (views die at the ack)."""

    def __init__(self, fail_on=None):
        self.got, self.batches, self.fail_on = {}, 0, fail_on

    def __call__(self, batch):
        self.batches += 1
        for name, view in batch:
            if name == self.fail_on:
                raise ValueError(f"cannot load {name}")
            self.got[name] = bytes(view)


def expected_bytes(buckets):
    return {name: data for b in buckets for name, _, _, data in b}


try:
    import torch
except ImportError:
    torch = None

REQUIRE_TORCH = os.environ.get("REQUIRE_TORCH") == "1"


def needs_torch(cls):
    """Skips the class without torch, unless REQUIRE_TORCH=1 makes that a failure."""
    if torch is not None:
        return cls
    if not REQUIRE_TORCH:
        return unittest.skip("torch is not installed")(cls)

    def setUp(self):
        self.fail(f"REQUIRE_TORCH=1, but {sys.executable} cannot import torch")
    cls.setUp = setUp
    return cls


def torch_bytes(t):
    """A CPU tensor's bytes, as they are in memory."""
    return bytes(t.detach().contiguous().view(-1).view(torch.uint8).tolist())


class FakeModel:
    def __init__(self, fail_on=None):
        self.loaded, self.calls, self.fail_on = {}, 0, fail_on

    def load_weights(self, weights):
        assert not isinstance(weights, (list, tuple)), "load_weights gets an iterator"
        self.calls += 1
        for name, view in weights:
            if name == self.fail_on:
                raise KeyError(name)
            self.loaded[name] = bytes(view)
        return set(self.loaded)
