"""The receiver's state machine: one engine process's connection to the daemon's socket for
one GPU, receiving updates bucket by bucket (PROTOCOL.md)."""
from __future__ import annotations

import collections
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, TypedDict

from .dtypes import dtype_size, torch_dtype
from .errors import ProtocolError, ReceiveError, UpdateAborted
from .protocol import PROTOCOL, Connection, Message, TensorEntry, check_tensor, is_whole, piece
from .slots import Mapper, Slot, View

log = logging.getLogger("ckptd.receiver")

class Delta(NamedTuple):
    """What `apply` gets instead of a view for a tensor sent as a delta (receivers that said
    `deltas=True`): element positions[i] of the tensor (flat, in checkpoint layout) takes
    values[i]. positions: int32 (torch) or a memoryview of uint32, ascending; values: the
    tensor's dtype. `numel`: the tensor's elements (every position is below it)."""

    positions: Any
    values: Any
    numel: int


Batch = list[tuple[str, "View | Delta"]]
"""One bucket's (name, view) pairs, as `apply` gets them; a Delta where the update sends one."""
Apply = Callable[[Batch], Iterable[str] | None]
"""Copies what it needs out of a batch; may return the names it did not use."""
Finish = Callable[[], object]


class Summary(TypedDict):
    """What `Receiver.receive` returns about the update it applied."""

    update: str
    checkpoint: str | None
    buckets: int
    tensors: int
    bytes: int
    seconds: float
    apply_seconds: float
    unknown: list[str]
    window_seconds: float | None


class SlotMapper(Protocol):
    """What the receiver needs of a mapper (Mapper, or a test's); `staging` and `close` are
    optional."""

    def map(self, desc: Message, welcome: Message) -> Slot: ...

    def sync(self) -> None: ...


def _delta(raw: Any, t: TensorEntry) -> Delta:
    """The Delta in a delta entry's bytes (a uint8 tensor or a memoryview; protocol.check_delta
    checked the layout)."""
    d, size = t["delta"], dtype_size(t["dtype"])
    count, numel = d["count"], math.prod(t["shape"])
    positions = raw[d["positions"]:d["positions"] + 4 * count]
    values = raw[d["values"]:d["values"] + size * count]
    if isinstance(raw, memoryview):
        return Delta(positions.cast("I"), values, numel)
    import torch
    return Delta(positions.view(torch.int32), values.view(torch_dtype(t["dtype"])), numel)


def _copy(v: Any) -> Any:
    """A copy of a view that outlives its slot: a torch clone, or bytes."""
    return bytes(v) if isinstance(v, memoryview) else v.clone()


def _nbytes(v: Any) -> int:
    return v.nbytes if isinstance(v, memoryview) else v.numel() * v.element_size()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


class Receiver:
    """One engine process's connection to the daemon's socket for one GPU.

    socket_path: `<socketDir>/gpu-<index>.sock`. device: the engine's torch device (see
    Mapper). name: how the daemon names this receiver in logs and errors. timeout: seconds
    to wait for each message from the daemon (None: forever); on expiry, TimeoutError (or a
    ReceiveError during an update). mapper: see Mapper; the default suits engines.
    """

    def __init__(self, socket_path: str, device: Any = None, name: str | None = None,
                 timeout: float | None = None, mapper: SlotMapper | None = None, partial: bool = False,
                 deltas: bool = False, stage_bytes: int = 0) -> None:
        if deltas and not partial:
            raise ValueError("deltas=True needs partial=True: a delta patches what the engine holds")
        self.socket_path = socket_path
        self.name = name or f"engine-{os.getpid()}"
        # stage_bytes: the memory this engine can spend holding an atomic update until its
        # commit (PROTOCOL.md "stage"); 0: atomic updates are refused for it by the daemon.
        self.stage_bytes = stage_bytes
        self._mapper: SlotMapper = mapper if mapper is not None else Mapper(device)
        self._pending: collections.deque[Message] = collections.deque()  # read ahead while draining
        # name -> [staging, bytes received, total] of the split tensors being assembled
        self._assembled: dict[str, list[Any]] = {}
        # updates finished or failed here: late messages about them are ignored
        self._closed: collections.deque[str | None] = collections.deque(maxlen=256)
        self._slots: dict[int, Slot] = {}
        self.generation: int | None = None
        self._conn = Connection(socket_path, timeout)
        try:
            # partial=True: updates may leave out the tensors this engine holds already (the
            # daemon tracks what it applied). Only for an engine whose weights nothing else
            # changes between updates (no sleep that drops them, no other loader), and that
            # takes any subset of its tensors (no fused pairs, no layer-by-layer reload).
            # deltas=True: a changed tensor may come as a Delta for apply to patch in place (the
            # engine holds it in checkpoint layout, as the update left it).
            self._send(op="hello", protocol=PROTOCOL, pid=os.getpid(), name=self.name, partial=partial,
                       deltas=deltas, stageBytes=stage_bytes)
            self.welcome = self._conn.read()
            if self.welcome.get("op") == "refused":
                raise ProtocolError(f"the daemon refused this receiver: {self.welcome.get('reason')}")
            if self.welcome.get("op") != "welcome" or self.welcome.get("protocol") != PROTOCOL:
                raise ProtocolError(f"expected a welcome for protocol {PROTOCOL}, got {self.welcome}")
            first = self._conn.read()
            if first.get("op") != "buffers":
                raise ProtocolError(f"expected buffers after welcome, got {first}")
            self._map(first)
        except BaseException:
            self.close()
            raise

    # -- socket ---------------------------------------------------------------------------

    def _send(self, **msg: Any) -> None:
        self._conn.send(msg)

    def _next(self) -> Message:
        """The next message other than `buffers`, which is handled here whenever it comes."""
        while True:
            msg = self._pending.popleft() if self._pending else self._conn.read()
            if msg.get("op") != "buffers":
                return msg
            self._map(msg)

    # -- buffers ----------------------------------------------------------------------------

    def _map(self, msg: Message) -> None:
        # Old mappings go first: every bucket of them was acked, so no copy reads them, and the
        # daemon may re-announce the same CUDA handle, which cannot be opened twice.
        self._unmap()
        slots: dict[int, Slot] = {}
        try:
            for desc in msg.get("slots", []):
                slots[desc["slot"]] = self._mapper.map(desc, self.welcome)
        except BaseException:
            for s in slots.values():
                s.close()
            raise
        self._slots, self.generation = slots, msg.get("generation")
        log.info("mapped buffers generation %s: %d slots", self.generation, len(slots))

    def _unmap(self) -> None:
        slots, self._slots = self._slots, {}
        for s in slots.values():
            s.close()

    # -- updates ----------------------------------------------------------------------------

    def receive(self, apply: Apply, finish: Finish | None = None, update: str | None = None,
                driven: bool = False, safe_point: Callable[[Callable[[], None]], None] | None = None) -> Summary:
        """Processes exactly one update and returns its summary.

        update: the daemon's id of the update this call is for (the engine was asked to take
        it): a `begin` of another one is refused (the daemon is told) before anything is
        applied. driven: the engine was asked to take the next update, so an `abort` that
        comes before any `begin` is that update failing before it reached this receiver:
        UpdateAborted (otherwise such an abort is logged and the wait goes on).

        apply(batch): batch is a list of (name, view) for one bucket; the views are valid only
        during the call, copies into the engine must be queued on the current CUDA stream (or
        be complete) when it returns. It may return the names it did not use (reported as
        "unknown"). finish(): runs after the last bucket, before `done`.
        An atomic update (its `begin` says `stage`) is staged instead: copies of what it sends
        are kept (at most `stage_bytes`) while the engine serves what it holds; at the daemon's
        `commit`, `safe_point(fn)` runs fn between the engine's forward passes (default: at
        once), and fn applies everything staged in one batch, then finish. The summary's
        `window_seconds` is how long that took (the engine served neither version).
        Raises UpdateAborted (daemon abort), ReceiveError (apply/finish failed here; the
        daemon was told), ProtocolError, ConnectionError, TimeoutError.
        """
        msg = self._wait_begin(driven or update is not None)
        if update is not None and msg["update"] != update:
            raise self._fail(msg["update"], None, ProtocolError(
                f"update {msg['update']} began, but this receiver was asked for update {update}"))
        update = msg["update"]
        assert update is not None
        t0 = time.perf_counter()
        self._assembled = {}
        summary: Summary = {"update": update, "checkpoint": msg.get("checkpoint"), "buckets": 0,
                            "tensors": 0, "bytes": 0, "seconds": 0.0, "apply_seconds": 0.0,
                            "unknown": [], "window_seconds": None}
        staged: Batch | None = [] if msg.get("stage") is True else None
        if staged is not None and self.stage_bytes <= 0:
            raise self._fail(update, None, ProtocolError(
                "the daemon asked this receiver to stage an atomic update, but it declared no stage_bytes"))
        take: Apply = apply if staged is None else self._stager(staged)
        expected = (msg.get("buckets"), msg.get("tensors"))
        while True:
            try:
                msg = self._next()
            except ConnectionError:
                raise
            except Exception as e:  # noqa: BLE001 - a timeout, or buffers that failed to map
                raise self._fail(update, None, e, drain=not isinstance(e, TimeoutError))
            op = msg.get("op")
            if op == "begin":  # the daemon moved on without an end or abort for this update
                self._pending.appendleft(msg)
                raise self._fail(update, None, ProtocolError(
                    f"update {msg.get('update')} began before update {update} ended"), drain=False)
            if msg.get("update") != update:
                if msg.get("update") in self._closed and op in ("bucket", "end", "abort"):
                    continue
                raise self._fail(update, None, ProtocolError(f"unexpected during update {update}: {msg}"))
            if op == "bucket":
                self._bucket(msg, take, summary)
            elif op == "abort":
                self._closed.append(update)
                raise UpdateAborted(update, msg.get("reason", ""))
            elif op == "end":
                try:
                    got = (summary["buckets"], summary["tensors"])
                    if None not in expected and got != expected:
                        raise ProtocolError(f"begin announced {expected[0]} buckets and "
                                            f"{expected[1]} tensors, got {got[0]} and {got[1]}")
                    if finish is not None and staged is None:
                        finish()
                except Exception as e:  # noqa: BLE001 - reported to the daemon, then raised
                    raise self._fail(update, None, e, drain=False)  # `end` was the last message
                if staged is not None:
                    summary["window_seconds"] = self._commit(update, staged, apply, finish, safe_point)
                    summary["seconds"] = time.perf_counter() - t0
                    return summary
                self._send(op="done", update=update)
                self._closed.append(update)
                summary["seconds"] = time.perf_counter() - t0
                return summary
            else:
                raise self._fail(update, None, ProtocolError(f"unexpected during update {update}: {msg}"))

    def _stager(self, staged: Batch) -> Apply:
        """An apply that keeps copies of what it gets (the views die at the ack), within
        stage_bytes."""
        held = [0]

        def stage(batch: Batch) -> None:
            for name, v in batch:
                if isinstance(v, Delta):
                    copy: Any = Delta(_copy(v.positions), _copy(v.values), v.numel)
                    n = _nbytes(v.positions) + _nbytes(v.values)
                else:
                    copy, n = _copy(v), _nbytes(v)
                held[0] += n
                if held[0] > self.stage_bytes:
                    raise MemoryError(f"staging needs more than the {self.stage_bytes} bytes this receiver declared")
                staged.append((name, copy))

        stage.piece = None  # type: ignore[attr-defined] - tensors in pieces are staged whole
        return stage

    def _commit(self, update: str, staged: Batch, apply: Apply, finish: Finish | None,
                safe_point: Callable[[Callable[[], None]], None] | None) -> float:
        """Answers `staged`, waits for the daemon's commit (or abort), applies what was staged
        at the engine's safe point; returns the seconds it took."""
        self._send(op="staged", update=update)
        msg = self._next()
        if msg.get("op") == "abort" and msg.get("update") == update:
            self._closed.append(update)
            staged.clear()
            raise UpdateAborted(update, msg.get("reason", ""))
        if msg.get("op") != "commit" or msg.get("update") != update:
            raise self._fail(update, None, ProtocolError(f"expected commit of update {update}, got {msg}"), drain=False)
        window = [0.0]

        def run() -> None:
            started = time.perf_counter()
            apply(list(staged))
            if finish is not None:
                finish()
            self._mapper.sync()
            window[0] = time.perf_counter() - started

        try:
            (safe_point or (lambda fn: fn()))(run)
        except Exception as e:  # noqa: BLE001 - reported to the daemon, then raised
            raise self._fail(update, None, e, drain=False) from e
        finally:
            staged.clear()
        self._send(op="committed", update=update, windowMs=round(window[0] * 1000, 3))
        self._closed.append(update)
        return window[0]

    def _wait_begin(self, driven: bool = False) -> Message:
        while True:
            msg = self._next()
            op, update = msg.get("op"), msg.get("update")
            if op == "begin" and isinstance(update, str):
                return msg
            if op in ("bucket", "end", "abort") and update in self._closed:
                continue  # the tail of an update this receiver already gave up on
            if op == "abort" and driven:
                self._closed.append(update)
                raise UpdateAborted(str(update), msg.get("reason", ""))
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

    def _bucket(self, msg: Message, apply: Apply, summary: Summary) -> None:
        started = time.perf_counter()
        bucket = msg.get("bucket")
        batch: Batch | None = None
        try:
            slot = self._slots.get(msg.get("slot"))  # type: ignore[arg-type]
            if slot is None:
                raise ProtocolError(f"bucket {bucket} is in slot {msg.get('slot')}, which buffers "
                                    f"generation {self.generation} does not have")
            tensors: list[TensorEntry] = msg.get("tensors", [])
            nbytes = sum(check_tensor(t, slot.bytes) for t in tensors)
            batch = []
            for t in tensors:
                view = slot.view(t)
                if "delta" in t:
                    raw = view if is_whole(t) else self._gather(t, view)
                    if raw is not None:
                        batch.append((t["name"], _delta(raw, t)))
                elif is_whole(t):
                    batch.append((t["name"], view))
                else:
                    whole = self._assemble(t, view, apply)
                    if whole is not None:
                        batch.append((t["name"], whole))
            unknown = apply(batch)
            batch = None  # the views die here: the slot is the daemon's again after the ack
            self._mapper.sync()
            # Assembled tensors were copied out by apply (synced above): free them now.
            self._assembled = {k: v for k, v in self._assembled.items() if v[1] < v[2]}
        except Exception as e:  # noqa: BLE001 - reported to the daemon, then raised
            # The traceback's frames would keep the views (and through them the slot) alive
            # after the update is dropped: clear their locals; file and line stay printable.
            batch = None
            traceback.clear_frames(e.__traceback__)
            raise self._fail(msg.get("update"), bucket, e)
        self._send(op="ack", update=msg["update"], bucket=bucket)
        summary["apply_seconds"] += time.perf_counter() - started
        summary["buckets"] += 1
        # A tensor counts once: whole, or by the piece that holds its last bytes.
        summary["tensors"] += sum(1 for t in tensors if piece(t)[1] == t["bytes"])
        summary["bytes"] += nbytes
        if unknown:
            summary["unknown"].extend(unknown)

    def _assemble(self, t: TensorEntry, view: View, apply: Apply) -> View | None:
        """One piece of a tensor larger than a bucket. If apply has a `piece(name, bytes_view,
        begin, total)` method, the piece goes straight to it (no extra memory); otherwise the
        pieces are gathered into a staging tensor, handed to apply whole once all its bytes
        arrived. Returns that whole tensor, or None."""
        to_place = getattr(apply, "piece", None)
        if to_place is not None:
            to_place(t["name"], view, piece(t)[0], t["bytes"])
            return None
        staged = self._gather(t, view)
        if staged is None or isinstance(staged, (bytearray, memoryview)):
            return staged
        return staged.view(torch_dtype(t["dtype"])).view(tuple(t["shape"]))

    def _gather(self, t: TensorEntry, view: View) -> Any:
        """One piece of an entry's bytes into its staging memory; the whole bytes (a uint8
        tensor, or a memoryview) once every piece came, else None."""
        name, (begin, end) = t["name"], piece(t)
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
        return memoryview(staged) if isinstance(staged, bytearray) else staged

    def _fail(self, update: str | None, bucket: int | None, exc: BaseException,
              drain: bool = True) -> ReceiveError:
        """Tells the daemon, drops the rest of the update (drain: reads it up to its abort or
        end); returns the ReceiveError for the caller to raise."""
        msg: Message = {"op": "error", "update": update, "message": _describe(exc)}
        if bucket is not None:
            msg["bucket"] = bucket
        log.error("update %s failed here (bucket %s): %s", update, bucket, msg["message"])
        try:
            self._send(**msg)
            if drain:
                self._drain(update)
        except Exception as e:  # noqa: BLE001 - daemon gone or silent: the error below says enough
            log.warning("while dropping update %s: %s", update, _describe(e))
        if update is not None:
            self._closed.append(update)
        err = ReceiveError(msg["message"], update, bucket)
        err.__cause__ = exc
        return err

    def _drain(self, update: str | None) -> None:
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

    def serve(self, apply: Apply, finish: Finish | None = None) -> None:
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

    def close(self) -> None:
        """Unmaps the slots and closes the socket. Idempotent."""
        try:
            self._unmap()
            close = getattr(self._mapper, "close", None)
            if close is not None:
                close()
        finally:
            self._conn.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
