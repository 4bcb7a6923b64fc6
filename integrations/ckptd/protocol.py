"""PROTOCOL.md on the wire: JSON lines over the daemon's Unix socket, and the checks on the
tensor entries of a `bucket` message."""
from __future__ import annotations

import json
import math
import socket
from typing import Any, TypeGuard

from .dtypes import dtype_size
from .errors import ProtocolError

PROTOCOL = 1

Message = dict[str, Any]
"""One JSON object of the protocol, either direction."""
TensorEntry = dict[str, Any]
"""One entry of a bucket's `tensors`: name, dtype, shape, bytes, offset, range."""


class Connection:
    """One connected Unix stream socket carrying JSON objects, one per `\\n`-terminated line.

    timeout: seconds to wait for each read (None: forever); on expiry, TimeoutError."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self._rbuf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
        except BaseException:
            self._sock.close()
            raise

    def send(self, msg: Message) -> None:
        self._sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def read(self) -> Message:
        """The next message; blank lines are skipped. Raises ProtocolError on a line that is
        not a JSON object, ConnectionError when the daemon closed the socket."""
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
                raise ConnectionError(f"the daemon closed {self.path}")
            self._rbuf += chunk

    def close(self) -> None:
        self._sock.close()


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def piece(t: TensorEntry) -> tuple[int, int]:
    """(begin, end) of the tensor's bytes that this entry holds: the whole tensor by default."""
    r = t.get("range")
    if r is None:
        return 0, t["bytes"]
    if not (isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r)
            and 0 <= r[0] <= r[1] <= t["bytes"]):
        raise ProtocolError(f"tensor {t.get('name')}: range {r} is not within [0, {t['bytes']}]")
    return r[0], r[1]


def is_whole(t: TensorEntry) -> bool:
    """Whether the entry holds the whole tensor (not one piece of a split one)."""
    begin, end = piece(t)
    return end - begin == t["bytes"]


def check_delta(t: TensorEntry) -> None:
    """A delta entry's layout: `count` uint32 positions and `count` values, inside its bytes."""
    d, name, nbytes = t.get("delta"), t["name"], t["bytes"]
    if not isinstance(d, dict) or not all(_is_int(d.get(k)) and d[k] >= 0 for k in ("count", "positions", "values")):
        raise ProtocolError(f"tensor {name}: malformed delta {d}")
    size = dtype_size(t.get("dtype"))
    count = d["count"]
    for part, start, width in (("positions", d["positions"], 4), ("values", d["values"], size)):
        if start + count * width > nbytes:
            raise ProtocolError(f"tensor {name}: the delta's {count} {part} at byte {start} do not fit "
                                f"its {nbytes} bytes")
        if start % width:
            raise ProtocolError(f"tensor {name}: the delta's {part} at byte {start} are not aligned")


def check_tensor(t: TensorEntry, slot_bytes: int) -> int:
    """Validates one tensor entry of a bucket against its slot; returns the bytes it holds."""
    name, shape, offset, nbytes = t.get("name"), t.get("shape"), t.get("offset"), t.get("bytes")
    if not isinstance(name, str) or not isinstance(shape, list) or not _is_int(offset) or \
            not _is_int(nbytes) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"malformed tensor entry: {t}")
    size = dtype_size(t.get("dtype"))
    if "delta" in t:
        check_delta(t)  # its bytes are the delta's, not the tensor's
    elif nbytes != math.prod(shape) * size:
        raise ProtocolError(f"tensor {name}: {nbytes} bytes, but shape {shape} of "
                            f"{t['dtype']} takes {math.prod(shape) * size}")
    if offset < 0:
        # A negative slice start would count from the slot's end: never a valid place.
        raise ProtocolError(f"tensor {name}: negative offset {offset} in its slot")
    begin, end = piece(t)
    if offset + end - begin > slot_bytes:
        raise ProtocolError(f"tensor {name}: bytes [{offset}, {offset + end - begin}) outside "
                            f"the slot's {slot_bytes} bytes")
    return end - begin
