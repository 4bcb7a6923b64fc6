"""Tests of the receiver against a fake daemon (tests/fake_daemon.py); torch optional.

    bash integrations/run-tests.sh -v      (every test, with a python that has torch where there is one)
    python3 -m unittest integrations.tests.test_receiver -v

The torch cases are skipped without torch, unless REQUIRE_TORCH=1 (CI), where they fail.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import types
import unittest
from unittest import mock

from integrations import ckptd as cr
from integrations import ckptd_receiver, vllm_extension
from integrations.ckptd import cuda, protocol, slots

from .fake_daemon import (
    ALL_DTYPES,
    TIMEOUT,
    FakeDaemon,
    Recorder,
    expected_bytes,
    host_mapper,
    make_buckets,
    needs_torch,
    torch,
    torch_bytes,
)

logging.getLogger("ckptd").addHandler(logging.NullHandler())  # failures are expected here


class ReceiverTest(unittest.TestCase):
    def setUp(self):
        self.daemon = FakeDaemon()
        self.receivers = []

    def tearDown(self):
        for r in self.receivers:
            r.close()
        self.daemon.close()

    def connect(self, script, **kw):
        self.daemon.start(script, **kw)
        kw = {"timeout": TIMEOUT, "mapper": host_mapper(), "name": "engine-test"}
        r = cr.Receiver(self.daemon.path, **kw)
        self.receivers.append(r)
        return r

    def test_hello_says_partial_only_when_asked(self):
        self.daemon.start(lambda d: None)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), name="p", partial=True)
        self.receivers.append(r)
        self.daemon.join()
        self.assertIs(self.daemon.hello["partial"], True)

    def test_update_delivers_exact_bytes_and_acks_in_order(self):
        buckets = make_buckets(1)
        out = {}
        r = self.connect(lambda d: out.setdefault("acks", d.push("u-1", buckets, "q@4")))
        rec = Recorder()
        summary = r.receive(rec)
        self.daemon.join()
        self.assertEqual(rec.got, expected_bytes(buckets))
        self.assertEqual(rec.batches, len(buckets))
        self.assertEqual(out["acks"][:-1], [{"op": "ack", "update": "u-1", "bucket": b}
                                            for b in range(len(buckets))])
        self.assertEqual(out["acks"][-1], {"op": "done", "update": "u-1"})
        self.assertEqual(self.daemon.hello, {"op": "hello", "protocol": 1, "pid": os.getpid(),
                                             "name": "engine-test", "partial": False, "deltas": False,
                                             "stageBytes": 0})
        self.assertEqual(summary["update"], "u-1")
        self.assertEqual(summary["checkpoint"], "q@4")
        self.assertEqual(summary["buckets"], len(buckets))
        self.assertEqual(summary["tensors"], sum(len(b) for b in buckets))
        self.assertEqual(summary["bytes"], sum(len(v) for v in expected_bytes(buckets).values()))
        self.assertEqual(summary["unknown"], [])
        self.assertGreaterEqual(summary["seconds"], 0)

    def test_a_tensor_split_over_buckets_is_assembled_whole(self):
        # A tensor larger than a bucket arrives as pieces (PROTOCOL.md: "range"); an apply
        # without a `piece` method gets it whole, with the last piece.
        rnd = random.Random(5)
        big, small = rnd.randbytes(300), rnd.randbytes(8)
        pieces = [(0, 128), (128, 256), (256, 300)]

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@1", "tensors": 2, "buckets": 3})
            for b, (lo, hi) in enumerate(pieces):
                slot = b % len(d.slot_files)
                with open(d.slot_files[slot], "r+b") as f:
                    f.write(big[lo:hi])
                    if b == 2:
                        f.seek(64)
                        f.write(small)
                entries = [{"name": "big", "dtype": "U8", "shape": [300], "bytes": 300, "offset": 0,
                            "range": [lo, hi]}]
                if b == 2:
                    entries.append({"name": "small", "dtype": "U8", "shape": [8], "bytes": 8,
                                    "offset": 64, "range": [0, 8]})
                d.send({"op": "bucket", "update": "u-1", "bucket": b, "slot": slot, "tensors": entries})
                assert d.recv_for("u-1") == {"op": "ack", "update": "u-1", "bucket": b}
            d.send({"op": "end", "update": "u-1"})
            assert d.recv_for("u-1") == {"op": "done", "update": "u-1"}

        r = self.connect(script)
        rec = Recorder()
        summary = r.receive(rec)
        self.daemon.join()
        self.assertEqual(rec.got, {"big": big, "small": small})
        self.assertEqual(summary["tensors"], 2)
        self.assertEqual(summary["bytes"], 308)

    def test_a_delta_comes_as_positions_and_values_even_in_pieces(self):
        # PROTOCOL.md "delta": the entry's bytes hold `count` uint32 positions and `count` values
        # at the offsets it names; split over buckets like any entry, handed to apply whole.
        positions = struct.pack("<3I", 1, 5, 99)
        values = struct.pack("<3f", 1.5, -2.0, 7.25)
        delta = positions + values  # positions at 0, values at 12
        layout = {"count": 3, "positions": 0, "values": 12}
        got = []

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@2", "tensors": 1, "buckets": 2})
            for b, (lo, hi) in enumerate([(0, 16), (16, 24)]):
                with open(d.slot_files[b], "r+b") as f:
                    f.write(delta[lo:hi])
                d.send({"op": "bucket", "update": "u-1", "bucket": b, "slot": b, "tensors": [
                    {"name": "w", "dtype": "F32", "shape": [10, 10], "bytes": 24, "offset": 0,
                     "range": [lo, hi], "delta": layout}]})
                assert d.recv_for("u-1") == {"op": "ack", "update": "u-1", "bucket": b}
            d.send({"op": "end", "update": "u-1"})
            assert d.recv_for("u-1") == {"op": "done", "update": "u-1"}

        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), partial=True, deltas=True)
        self.receivers.append(r)

        def apply(batch):
            for name, d in batch:
                got.append((name, list(d.positions), bytes(d.values), d.numel))

        summary = r.receive(apply)
        self.daemon.join()
        self.assertIs(self.daemon.hello["deltas"], True)
        self.assertEqual(got, [("w", [1, 5, 99], values, 100)])
        self.assertEqual(summary["tensors"], 1)

    def test_a_malformed_delta_is_refused_naming_it(self):
        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@2", "tensors": 1, "buckets": 1})
            d.send({"op": "bucket", "update": "u-1", "bucket": 0, "slot": 0, "tensors": [
                {"name": "w", "dtype": "F32", "shape": [10], "bytes": 16, "offset": 0,
                 "delta": {"count": 3, "positions": 0, "values": 8}}]})
            err = d.recv_for("u-1")
            assert err["op"] == "error" and "the delta's 3 values at byte 8 do not fit its 16 bytes" in err["message"], err
            d.send({"op": "abort", "update": "u-1", "reason": "receiver failed"})

        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), partial=True, deltas=True)
        self.receivers.append(r)
        with self.assertRaises(cr.ReceiveError):
            r.receive(lambda batch: None)
        self.daemon.join()
        with self.assertRaisesRegex(ValueError, "deltas=True needs partial=True"):
            cr.Receiver(self.daemon.path, deltas=True)

    def stage_script(self, ending, tensors=2):
        """An atomic update of `tensors` 8-byte tensors in one bucket; `ending(d)` after `staged`."""
        data = [bytes([i]) * 8 for i in range(tensors)]

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@2", "tensors": tensors, "buckets": 1,
                    "stage": True})
            d.send(d.write_bucket("u-1", 0, 0, [(f"t{i}", "U8", [8], x) for i, x in enumerate(data)]))
            assert d.recv_for("u-1") == {"op": "ack", "update": "u-1", "bucket": 0}
            d.send({"op": "end", "update": "u-1"})
            assert d.recv_for("u-1") == {"op": "staged", "update": "u-1"}
            ending(d)
        return script, data

    def test_an_atomic_update_is_staged_then_applied_in_one_batch_at_its_commit(self):
        def ending(d):
            d.send({"op": "commit", "update": "u-1"})
            m = d.recv_for("u-1")
            assert m["op"] == "committed" and m["windowMs"] >= 0, m

        script, data = self.stage_script(ending)
        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), stage_bytes=1000)
        self.receivers.append(r)
        batches, at_safe_point = [], []
        summary = r.receive(lambda b: batches.append([(n, bytes(v)) for n, v in b]),
                            safe_point=lambda fn: (at_safe_point.append(True), fn()))
        self.daemon.join()
        self.assertEqual(self.daemon.hello["stageBytes"], 1000)
        self.assertEqual(batches, [[("t0", data[0]), ("t1", data[1])]])  # once, at the commit
        self.assertEqual(at_safe_point, [True])
        self.assertIsNotNone(summary["window_seconds"])

    def test_an_atomic_update_aborted_after_staging_applies_nothing(self):
        script, _ = self.stage_script(lambda d: d.send({"op": "abort", "update": "u-1", "reason": "another engine failed"}))
        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), stage_bytes=1000)
        self.receivers.append(r)
        applied = []
        with self.assertRaises(cr.UpdateAborted):
            r.receive(applied.append)
        self.daemon.join()
        self.assertEqual(applied, [])

    def test_staging_past_the_declared_room_fails_the_update(self):
        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@2", "tensors": 2, "buckets": 1, "stage": True})
            d.send(d.write_bucket("u-1", 0, 0, [("a", "U8", [8], b"x" * 8), ("b", "U8", [8], b"y" * 8)]))
            err = d.recv_for("u-1")
            assert err["op"] == "error" and "more than the 10 bytes this receiver declared" in err["message"], err
            d.send({"op": "abort", "update": "u-1", "reason": "receiver failed"})

        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper(), stage_bytes=10)
        self.receivers.append(r)
        with self.assertRaises(cr.ReceiveError):
            r.receive(lambda b: None)
        self.daemon.join()

    def test_views_are_the_slot_files_bytes(self):
        # The receiver maps the slot: what apply sees is the file's content at the offsets.
        buckets = make_buckets(2, sizes=(3,))
        seen = []

        def apply(batch):
            with open(self.daemon.slot_files[0], "rb") as f:
                content = f.read()
            seen.extend((bytes(view), content) for _, view in batch)

        r = self.connect(lambda d: d.push("u-1", buckets))
        r.receive(apply)
        self.daemon.join()
        entries = next(m for m in self.daemon.sent if m["op"] == "bucket")["tensors"]
        self.assertEqual(len(seen), 3)
        for (data, content), t in zip(seen, entries):
            self.assertEqual(data, content[t["offset"]:t["offset"] + t["bytes"]])

    def test_sync_runs_before_each_ack(self):
        events = []

        class SpyMapper(cr.Mapper):
            def sync(self):
                events.append("sync")

        buckets = make_buckets(3, sizes=(1, 1, 1))
        self.daemon.start(lambda d: d.push("u-1", buckets))
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=SpyMapper(use_torch=False))
        self.receivers.append(r)
        send = r._send
        r._send = lambda **m: (events.append(m["op"]), send(**m))
        r.receive(lambda batch: events.append("apply"))
        self.daemon.join()
        self.assertEqual(events, ["apply", "sync", "ack"] * 3 + ["done"])

    def test_apply_error_is_reported_and_the_next_update_works(self):
        buckets = make_buckets(4)
        bad = buckets[2][0][0]
        out = {}

        def script(d):
            msgs = d.push("u-1", buckets, stop_after=2)  # ack of 0 before bucket 2 reuses slot 0
            msgs += [d.recv(), d.recv()]  # ack of 1, then the error for bucket 2
            out["msgs"] = msgs
            d.send({"op": "abort", "update": "u-1", "reason": "engine-test: failed"})
            out["acks"] = d.push("u-2", buckets)

        r = self.connect(script)
        with self.assertRaises(cr.ReceiveError) as ctx:
            r.receive(Recorder(fail_on=bad))
        self.assertIn(f"ValueError: cannot load {bad}", str(ctx.exception))
        self.assertEqual((ctx.exception.update, ctx.exception.bucket), ("u-1", 2))
        rec = Recorder()
        summary = r.receive(rec)
        self.daemon.join()
        self.assertEqual(out["msgs"][:2], [{"op": "ack", "update": "u-1", "bucket": 0},
                                           {"op": "ack", "update": "u-1", "bucket": 1}])
        err = out["msgs"][2]
        self.assertEqual((err["op"], err["update"], err["bucket"]), ("error", "u-1", 2))
        self.assertEqual(err["message"], f"ValueError: cannot load {bad}")
        self.assertEqual(summary["update"], "u-2")
        self.assertEqual(rec.got, expected_bytes(buckets))
        # The exception's traceback does not keep the failed bucket's views (and the slot)
        with self.assertNoLogs("ckptd.receiver", logging.WARNING):
            r.close()

    def test_error_drain_ends_at_a_new_begin_without_abort(self):
        # A daemon that does not send abort to the receiver that failed: the next begin ends
        # the drain and is not lost.
        buckets = make_buckets(5, sizes=(1, 1))

        def script(d):
            d.push("u-1", buckets, stop_after=1)
            assert d.recv()["op"] == "error"
            d.push("u-2", buckets)

        r = self.connect(script)
        with self.assertRaises(cr.ReceiveError):
            r.receive(Recorder(fail_on=buckets[0][0][0]))
        self.assertEqual(r.receive(Recorder())["update"], "u-2")
        self.daemon.join()

    def test_begin_before_end_fails_the_open_update_and_keeps_the_new_one(self):
        buckets = make_buckets(12, sizes=(1, 1))

        def script(d):
            d.push("u-1", buckets, stop_after=0)
            d.push("u-2", buckets)

        r = self.connect(script)
        with self.assertRaisesRegex(cr.ReceiveError, "update u-2 began before update u-1 ended"):
            r.receive(Recorder())
        rec = Recorder()
        self.assertEqual(r.receive(rec)["update"], "u-2")
        self.daemon.join()
        self.assertEqual(rec.got, expected_bytes(buckets))

    def test_finish_error_is_reported(self):
        buckets = make_buckets(6, sizes=(2,))
        out = {}

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 2, "buckets": 1})
            d.send(d.write_bucket("u-1", 0, 0, buckets[0]))
            out["ack"] = d.recv()
            d.send({"op": "end", "update": "u-1"})
            out["error"] = d.recv()
            d.send({"op": "abort", "update": "u-1", "reason": "finish failed"})  # late: ignored
            out["acks"] = d.push("u-2", buckets)

        def finish():
            raise RuntimeError("post-processing broke")

        r = self.connect(script)
        with self.assertRaises(cr.ReceiveError) as ctx:
            r.receive(Recorder(), finish)
        self.assertIn("RuntimeError: post-processing broke", str(ctx.exception))
        self.assertEqual(r.receive(Recorder())["update"], "u-2")
        self.daemon.join()
        self.assertEqual(out["error"], {"op": "error", "update": "u-1",
                                        "message": "RuntimeError: post-processing broke"})

    def test_an_abort_before_any_begin_is_passed_over_unless_the_update_was_asked_for(self):
        buckets = make_buckets(40, sizes=(1,))
        r = self.connect(lambda d: (d.send({"op": "abort", "update": "u-0", "reason": "x"}), d.push("u-1", buckets),
                                    d.send({"op": "abort", "update": "u-2", "reason": "no receiver on GPU 1"})))
        rec = Recorder()
        self.assertEqual(r.receive(rec)["update"], "u-1")  # a serving engine waits on
        with self.assertRaisesRegex(cr.UpdateAborted, "update u-2 aborted: no receiver on GPU 1"):
            r.receive(rec, driven=True)  # an engine asked for the next update hears of its failure
        self.daemon.join()

    def test_abort_raises_and_the_next_update_works_on_the_same_connection(self):
        buckets = make_buckets(7)

        def script(d):
            d.push("u-1", buckets, stop_after=1)
            d.send({"op": "abort", "update": "u-1", "reason": "peer 10.0.0.2 died"})
            d.push("u-2", buckets)

        r = self.connect(script)
        with self.assertRaises(cr.UpdateAborted) as ctx:
            r.receive(Recorder())
        self.assertEqual((ctx.exception.update, ctx.exception.reason), ("u-1", "peer 10.0.0.2 died"))
        rec = Recorder()
        self.assertEqual(r.receive(rec)["update"], "u-2")
        self.daemon.join()
        self.assertEqual(rec.got, expected_bytes(buckets))
        self.assertEqual(sum(1 for m in self.daemon.received if m.get("op") == "hello"), 1)

    def test_new_buffers_generation_remaps(self):
        buckets1, buckets2 = make_buckets(8), make_buckets(9, sizes=(5, 5))
        slots = []

        class SpyMapper(cr.Mapper):
            def map(self, desc, welcome):
                slots.append(super().map(desc, welcome))
                return slots[-1]

        def script(d):
            d.push("u-1", buckets1)
            d.send(d.new_buffers(3, 8192))
            d.push("u-2", buckets2)

        self.daemon.start(script)
        r = cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=SpyMapper(use_torch=False))
        self.receivers.append(r)
        r.receive(Recorder())
        self.assertEqual((r.generation, len(slots)), (1, 2))
        rec = Recorder()
        r.receive(rec)
        self.daemon.join()
        self.assertEqual((r.generation, len(slots)), (2, 5))
        self.assertTrue(all(s._mm.closed for s in slots[:2]), "generation 1 still mapped")
        self.assertFalse(any(s._mm.closed for s in slots[2:]))
        self.assertEqual(rec.got, expected_bytes(buckets2))
        r.close()
        self.assertTrue(all(s._mm.closed for s in slots))

    def test_bad_tensor_entry_is_an_error_naming_it(self):
        out = {}

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 1, "buckets": 1})
            d.send({"op": "bucket", "update": "u-1", "bucket": 0, "slot": 0, "tensors": [
                {"name": "w", "dtype": "F4", "shape": [2], "offset": 0, "bytes": 1}]})
            out["error"] = d.recv()
            d.send({"op": "abort", "update": "u-1", "reason": "x"})

        r = self.connect(script)
        with self.assertRaises(cr.ReceiveError) as ctx:
            r.receive(Recorder())
        self.daemon.join()
        self.assertIn("dtype 'F4' is not supported", str(ctx.exception))
        self.assertEqual(out["error"]["bucket"], 0)

    def test_out_of_slot_range_is_an_error(self):
        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 1, "buckets": 1})
            d.send({"op": "bucket", "update": "u-1", "bucket": 0, "slot": 0, "tensors": [
                {"name": "w", "dtype": "F32", "shape": [2000], "offset": 0, "bytes": 8000}]})
            d.recv()
            d.send({"op": "abort", "update": "u-1", "reason": "x"})

        r = self.connect(script)
        with self.assertRaisesRegex(cr.ReceiveError, "outside the slot's 4096 bytes"):
            r.receive(Recorder())
        self.daemon.join()

    def test_count_mismatch_at_end_is_an_error(self):
        buckets = make_buckets(10, sizes=(2,))
        out = {}

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 3, "buckets": 2})
            d.send(d.write_bucket("u-1", 0, 0, buckets[0]))
            d.recv()
            d.send({"op": "end", "update": "u-1"})
            out["error"] = d.recv()

        r = self.connect(script)
        with self.assertRaisesRegex(cr.ReceiveError, "announced 2 buckets and 3 tensors"):
            r.receive(Recorder())
        self.daemon.join()
        self.assertEqual(out["error"]["op"], "error")

    def test_fewer_tensors_than_announced_is_an_error_even_with_every_bucket(self):
        # Every announced bucket arrives, but one tensor short: a receiver that counted only
        # buckets would call the update complete with a weight missing.
        buckets = make_buckets(13, sizes=(2, 1))
        out = {}

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 4, "buckets": 2})
            for b, tensors in enumerate(buckets):
                d.send(d.write_bucket("u-1", b, b, tensors))
                assert d.recv() == {"op": "ack", "update": "u-1", "bucket": b}
            d.send({"op": "end", "update": "u-1"})
            out["error"] = d.recv()
            out["next"] = d.push("u-2", buckets)

        r = self.connect(script)
        with self.assertRaisesRegex(cr.ReceiveError, "announced 2 buckets and 4 tensors, got 2 and 3"):
            r.receive(Recorder())
        self.assertEqual(r.receive(Recorder())["update"], "u-2")  # the connection is still good
        self.daemon.join()
        self.assertEqual(out["error"], {"op": "error", "update": "u-1", "message":
                                        "ProtocolError: begin announced 2 buckets and 4 tensors, "
                                        "got 2 and 3"})

    def test_negative_offset_is_rejected_before_apply(self):
        # base[-8:0] would be empty and base[-8:...] would read the slot's last bytes: either
        # way never the tensor. The error names the tensor and its offset.
        applied = []

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c", "tensors": 1, "buckets": 1})
            d.send({"op": "bucket", "update": "u-1", "bucket": 0, "slot": 0, "tensors": [
                {"name": "w", "dtype": "F32", "shape": [2], "offset": -8, "bytes": 8}]})
            assert d.recv()["op"] == "error"
            d.send({"op": "abort", "update": "u-1", "reason": "x"})

        r = self.connect(script)
        with self.assertRaises(cr.ReceiveError) as ctx:
            r.receive(applied.append)
        self.daemon.join()
        self.assertEqual(str(ctx.exception), "ProtocolError: tensor w: negative offset -8 in its slot")
        self.assertEqual((ctx.exception.update, ctx.exception.bucket), ("u-1", 0))
        self.assertEqual(applied, [])

    def test_negative_offset_table(self):
        entry = {"name": "w", "dtype": "U8", "shape": [4], "bytes": 4}
        for offset, want in [(0, 4), (4092, 4), (-1, "negative offset -1"), (-4096, "negative offset"),
                             (4093, r"bytes \[4093, 4097\) outside the slot's 4096 bytes"),
                             (True, "malformed tensor entry")]:
            with self.subTest(offset=offset):
                t = dict(entry, offset=offset)
                if isinstance(want, int):
                    self.assertEqual(protocol.check_tensor(t, 4096), want)
                else:
                    with self.assertRaisesRegex(cr.ProtocolError, want):
                        protocol.check_tensor(t, 4096)

    def test_unknown_names_are_reported(self):
        buckets = make_buckets(11, sizes=(3,))
        r = self.connect(lambda d: d.push("u-1", buckets))
        summary = r.receive(lambda batch: [n for n, _ in batch][1:])
        self.daemon.join()
        self.assertEqual(summary["unknown"], [n for n, *_ in buckets[0]][1:])

    def test_protocol_version_mismatch(self):
        self.daemon.start(lambda d: None, welcome={"op": "welcome", "protocol": 2})
        with self.assertRaisesRegex(cr.ProtocolError, "protocol 1"):
            cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper())
        try:
            self.daemon.join()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the receiver hung up on the bad welcome before the buffers were sent


    def test_refused_by_the_daemon(self):
        reason = "uid 12345 is not the daemon's user (uid 0); engines of other users need engineGroup"
        self.daemon.start(lambda d: None, welcome={"op": "refused", "reason": reason})
        with self.assertRaisesRegex(cr.ProtocolError, "^the daemon refused this receiver: uid 12345 is not"):
            cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=host_mapper())
        try:
            self.daemon.join()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def test_daemon_gone(self):
        def script(d):
            d.conn.close()
            d.conn = None

        r = self.connect(script)
        self.daemon.join()
        with self.assertRaises(ConnectionError):
            r.receive(Recorder())


UUIDS = ["0" * 32, "a1b2c3d4e5f60718293a4b5c6d7e8f90", "f" * 32]  # as libcuda gives them


def daemon_uuid(hex32):
    """The daemon's form of a GPU UUID (nvidia-smi's): GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    h = hex32.upper()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class FakeDriver:
    """CudaDriver's surface, over UUIDS instead of libcuda: every call succeeds."""

    def __init__(self, uuids=UUIDS):
        self.uuids, self.calls = list(uuids), []

    def count(self):
        return len(self.uuids)

    def uuid(self, ordinal):
        return self.uuids[ordinal]

    def call(self, name, *args):
        self.calls.append(name)


def fake_torch():
    """What CudaDevice and CudaSlot ask of torch, without a GPU or torch."""
    def device(kind, index=None):
        if index is None and ":" in kind:
            kind, index = kind.split(":")[0], int(kind.split(":")[1])
        return types.SimpleNamespace(type=kind, index=index)
    return types.SimpleNamespace(
        device=device, zeros=lambda *a, **kw: None, as_tensor=lambda obj, device: ("tensor", device.index),
        cuda=types.SimpleNamespace(current_device=lambda: 0), Tensor=type("Tensor", (), {}))


class CudaUuidTest(unittest.TestCase):
    """The daemon's welcome names its GPU by UUID; the receiver must map the slots on that GPU
    (CUDA IPC would open them on any other device, or fail obscurely)."""

    def test_find_ordinal_table(self):
        drv = FakeDriver()
        for uuid, index, want in [
            (daemon_uuid(UUIDS[1]), None, 1),           # found by UUID among the visible ones
            (daemon_uuid(UUIDS[2]).lower(), None, 2),   # case and dashes do not matter
            (daemon_uuid(UUIDS[1]), 1, 1),              # the engine's device is the daemon's
            ("", 2, 2),                                 # no UUID announced: taken at its word
            (daemon_uuid(UUIDS[1]), 0, "serves GPU GPU-A1B2C3D4-.*, but cuda:0 here is "
                                       f"GPU-{UUIDS[0]}: wrong socket for this device"),
            (daemon_uuid("12" * 16), None, "the daemon's GPU GPU-12121212-.* is not visible"),
            ("", None, "is not visible"),
        ]:
            with self.subTest(uuid=uuid, index=index):
                if isinstance(want, int):
                    self.assertEqual(cuda.find_ordinal(drv, uuid, index), want)
                else:
                    with self.assertRaisesRegex(RuntimeError, want):
                        cuda.find_ordinal(drv, uuid, index)

    def connect(self, uuid, device):
        """A receiver whose daemon announces `uuid` and CUDA slots, with libcuda and torch
        replaced by fakes; returns (receiver or the exception, the fake driver)."""
        daemon = FakeDaemon()
        self.addCleanup(daemon.close)
        daemon.buffers = {"op": "buffers", "generation": 1, "slots": [
            {"slot": i, "bytes": 4096, "kind": "cuda", "handle": f"{i:02x}" * 64} for i in range(2)]}
        daemon.start(lambda d: None, welcome={"op": "welcome", "protocol": 1, "gpu": 3,
                                              "uuid": uuid, "backend": "cuda"})
        drv = FakeDriver()
        with mock.patch.object(cuda, "CudaDriver", lambda: drv), \
                mock.patch.object(slots, "import_torch", fake_torch):
            try:
                r = cr.Receiver(daemon.path, device=device, timeout=TIMEOUT)
            except RuntimeError as e:
                r = e
        daemon.join()
        return r, drv

    def test_the_slots_open_on_the_gpu_the_daemon_named(self):
        for device in (None, "cuda:1"):
            with self.subTest(device=device):
                r, drv = self.connect(daemon_uuid(UUIDS[1]), device)
                assert isinstance(r, cr.Receiver) and isinstance(r._mapper, cr.Mapper), r
                assert r._mapper._cuda is not None
                self.assertEqual(r._mapper._cuda.index, 1)
                self.assertEqual([s._base for s in r._slots.values()], [("tensor", 1)] * 2)
                self.assertEqual(drv.calls.count("cuIpcOpenMemHandle"), 2)
                r.close()
                self.assertEqual(drv.calls.count("cuIpcCloseMemHandle"), 2)
                self.assertEqual(drv.calls[-1], "cuDevicePrimaryCtxRelease")

    def test_a_device_other_than_the_daemons_gpu_is_refused(self):
        r, drv = self.connect(daemon_uuid(UUIDS[1]), "cuda:2")
        self.assertIsInstance(r, RuntimeError)
        self.assertEqual(str(r), f"this socket serves GPU {daemon_uuid(UUIDS[1])}, but cuda:2 here is "
                                 f"GPU-{UUIDS[2]}: wrong socket for this device (check CUDA_VISIBLE_DEVICES)")
        self.assertNotIn("cuIpcOpenMemHandle", drv.calls)  # nothing was mapped on the wrong GPU

    def test_a_daemon_gpu_not_visible_here_is_refused(self):
        r, drv = self.connect(daemon_uuid("12" * 16), None)
        self.assertIsInstance(r, RuntimeError)
        self.assertRegex(str(r), "the daemon's GPU GPU-12121212-.* is not visible to this process")
        self.assertNotIn("cuIpcOpenMemHandle", drv.calls)


@needs_torch
class TorchHostViewsTest(unittest.TestCase):
    """Where torch is installed: host slots give typed CPU tensors over the mapping, and
    apply_to_params loads them into a model's parameters."""

    def setUp(self):
        self.daemon = FakeDaemon(slot_bytes=1 << 16)
        self.addCleanup(self.daemon.close)

    def receive(self, apply, script):
        self.daemon.start(script)
        with cr.Receiver(self.daemon.path, timeout=TIMEOUT, mapper=cr.Mapper("cpu", use_torch=True)) as r:
            summary = r.receive(apply)
        self.daemon.join()
        return summary

    def test_typed_views(self):
        here = [d for d in ALL_DTYPES if hasattr(torch, cr.DTYPES[d][0])]  # float8: torch >= 2.1
        buckets = make_buckets(40, sizes=(6, 6), dtypes=here)
        got = {}

        def apply(batch):
            for name, t in batch:
                got[name] = (t.dtype, list(t.shape), torch_bytes(t))

        self.receive(apply, lambda d: d.push("u-1", buckets))
        want = {n: (cr.torch_dtype(d), s, b) for bk in buckets for n, d, s, b in bk}
        self.assertEqual(got, want)

    def model(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def test_apply_to_params_loads_a_module_whose_parameters_require_grad(self):
        # README's usage on a plain nn.Module: every parameter is a leaf that requires grad, into
        # which autograd refuses an in-place copy unless it runs under no_grad.
        model = self.model()
        params = dict(model.named_parameters())
        rnd = random.Random(41)
        sent = {n: rnd.randbytes(p.numel() * 4) for n, p in params.items()}
        buckets = [[(n, "F32", list(params[n].shape), sent[n]) for n in names]
                   for names in (["0.weight", "0.bias"], ["2.weight", "2.bias"])]
        counts = collections.Counter()
        summary = self.receive(cr.apply_to_params(params, counts),
                               lambda d: d.push("u-1", buckets))
        self.assertEqual((summary["tensors"], summary["unknown"]), (4, []))
        self.assertEqual(counts, {n: 1 for n in params})
        self.assertEqual({n: torch_bytes(p) for n, p in model.named_parameters()}, sent)
        for n, p in model.named_parameters():
            self.assertTrue(p.requires_grad and p.is_leaf and p.grad is None, n)
        model(torch.ones(2, 8)).sum().backward()  # still trainable
        self.assertTrue(all(p.grad is not None for p in model.parameters()))

    def test_pieces_of_a_split_tensor_land_in_a_parameter_that_requires_grad(self):
        model = self.model()
        p = model[0].weight  # 16 x 8 F32: 512 bytes, sent in three pieces, out of order
        data = random.Random(42).randbytes(512)
        pieces = [(256, 512), (0, 200), (200, 256)]

        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "s@1", "tensors": 1, "buckets": 3})
            for b, (lo, hi) in enumerate(pieces):
                slot = b % len(d.slot_files)
                with open(d.slot_files[slot], "r+b") as f:
                    f.write(data[lo:hi])
                d.send({"op": "bucket", "update": "u-1", "bucket": b, "slot": slot, "tensors": [
                    {"name": "0.weight", "dtype": "F32", "shape": [16, 8], "bytes": 512, "offset": 0,
                     "range": [lo, hi]}]})
                assert d.recv_for("u-1") == {"op": "ack", "update": "u-1", "bucket": b}
            d.send({"op": "end", "update": "u-1"})
            assert d.recv_for("u-1") == {"op": "done", "update": "u-1"}

        counts = collections.Counter()
        self.receive(cr.apply_to_params(dict(model.named_parameters()), counts), script)
        self.assertEqual(torch_bytes(p), data)
        self.assertEqual(counts, {"0.weight": 1})
        self.assertTrue(p.requires_grad and p.is_leaf)


class HelpersTest(unittest.TestCase):
    def test_dtypes(self):
        self.assertEqual([cr.dtype_size(d) for d in ("BF16", "F32", "I64", "F8_E5M2", "BOOL")],
                         [2, 4, 8, 1, 1])
        with self.assertRaisesRegex(ValueError, "dtype 'F8_E8M0' is not supported"):
            cr.dtype_size("F8_E8M0")

    def test_physical_gpu_index(self):
        self.assertEqual(cr.physical_gpu_index(1, ""), 1)
        self.assertEqual(cr.physical_gpu_index(1, "4,6"), 6)
        with self.assertRaisesRegex(ValueError, "not an index"):
            cr.physical_gpu_index(0, "GPU-1234")
        with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": "3,2"}):
            self.assertEqual(cr.gpu_socket_path("/run/ckptd", 0), "/run/ckptd/gpu-3.sock")

    def test_sockets_by_gpu_uuid(self):
        # The daemon links <uuid>.sock to each GPU's gpu-<i>.sock; CUDA accepts unique prefixes.
        with tempfile.TemporaryDirectory(prefix="ckptd-test-") as d:
            for i, uuid in enumerate(["GPU-8a1c0000-aaaa", "GPU-8b2d0000-bbbb"]):
                open(os.path.join(d, f"gpu-{i}.sock"), "w").close()
                os.symlink(f"gpu-{i}.sock", os.path.join(d, f"{uuid}.sock"))
            visible = "GPU-8b2d0000-bbbb,GPU-8a1c"
            self.assertEqual(cr.gpu_socket_path(d, 0, visible), os.path.join(d, "GPU-8b2d0000-bbbb.sock"))
            self.assertEqual(cr.gpu_socket_path(d, 1, visible), os.path.join(d, "GPU-8a1c0000-aaaa.sock"))
            with self.assertRaisesRegex(ValueError, r"entry 'GPU-8' matches more than one GPU of the daemon "
                                        r".*\(its GPUs: GPU-8a1c0000-aaaa, GPU-8b2d0000-bbbb\)"):
                cr.gpu_socket_path(d, 0, "GPU-8")
            with self.assertRaisesRegex(ValueError, "entry 'GPU-ffff' matches no GPU of the daemon"):
                cr.gpu_socket_path(d, 0, "GPU-ffff")
            with self.assertRaisesRegex(ValueError, "entry 'gpu-0' matches no GPU"):
                cr.gpu_socket_path(d, 0, "gpu-0")  # the index sockets are not UUIDs
        with self.assertRaisesRegex(ValueError, "cannot list the daemon's socket directory /nonexistent"):
            cr.gpu_socket_path("/nonexistent", 0, "GPU-1")

    def test_the_old_module_names_the_same_objects(self):
        self.assertIs(ckptd_receiver.Receiver, cr.Receiver)
        self.assertIs(ckptd_receiver.apply_to_params, cr.apply_to_params)
        self.assertIs(vllm_extension.Receiver, cr.Receiver)

    def test_old_module_loads_with_integrations_on_sys_path(self):
        # As bench/tiny_update.py loads it: `from ckptd_receiver import ...`, from elsewhere.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # integrations/
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from ckptd_receiver import Receiver, apply_to_params; print(Receiver.__module__)")
        import subprocess
        out = subprocess.run([sys.executable, "-c", code, here], cwd=tempfile.gettempdir(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "integrations.ckptd.receiver"), out.stderr)

    def test_apply_to_params_with_fake_tensors(self):
        class T:
            def __init__(self, shape):
                self.shape, self.copied = shape, None

            def copy_(self, src, non_blocking=False):
                self.copied = (src, non_blocking)

        params, counts = {"a": T((2, 3))}, collections.Counter()
        apply = cr.apply_to_params(params, counts)
        self.assertEqual(apply([("a", T((2, 3))), ("zz", T((1,)))]), ["zz"])
        self.assertTrue(params["a"].copied[1])
        self.assertEqual(counts, {"a": 1})
        with self.assertRaisesRegex(ValueError, r"a: received shape \[3\], parameter has \[2, 3\]"):
            apply([("a", T((3,)))])


if __name__ == "__main__":
    unittest.main()
