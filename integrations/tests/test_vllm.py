"""ckptd's vLLM side against stand-ins of vLLM (tests/vllm_standins.py, written from vLLM's
source) and a fake daemon: the weight transfer backend driven the way vLLM's worker drives it,
and the worker extension. Needs torch.

    python3 -m unittest integrations.tests.test_vllm -v
"""
from __future__ import annotations

import importlib
import json
import os
import random
import sys
import types
import unittest
from unittest import mock

from integrations import ckptd as cr

from .fake_daemon import TIMEOUT, FakeDaemon, needs_torch, torch

if torch is not None:
    from . import vllm_standins as vs


def tensor_bytes(t):
    return t.detach().contiguous().numpy().tobytes()


def buckets_of(ckpt, per_bucket=3, seed=0):
    """The checkpoint's tensors, shuffled (so a layer straddles buckets), per_bucket to a bucket."""
    names = list(ckpt)
    random.Random(seed).shuffle(names)
    entries = [(n, "F32", list(ckpt[n].shape), tensor_bytes(ckpt[n])) for n in names]
    return [entries[i:i + per_bucket] for i in range(0, len(entries), per_bucket)]


def fails_then_succeeds(buckets):
    """A fake daemon's script: u-1, which the receiver fails at bucket 0 and the daemon aborts, then u-2."""
    def script(d):
        d.push("u-1", buckets, stop_after=0)
        assert d.recv()["op"] == "error"
        d.send({"op": "abort", "update": "u-1", "reason": "an engine failed"})
        d.push("u-2", buckets)
    return script


def cpu_receiver(path, timeout_s):
    return cr.Receiver(path, timeout=timeout_s, mapper=cr.Mapper("cpu", use_torch=True))


QUANTIZED = types.SimpleNamespace(quantization="fp8", use_mla=False)
PLAIN = types.SimpleNamespace(quantization=None, use_mla=False)


@needs_torch
class TransferEngineTest(unittest.TestCase):
    """The backend as vLLM's worker drives it: the factory builds it, then init, and per update
    start, update_weights, finish (vllm/v1/worker/gpu_worker.py)."""

    def setUp(self):
        self.modules = mock.patch.dict(sys.modules, vs.install())
        self.modules.start()
        self.addCleanup(self.modules.stop)
        from integrations.ckptd.vllm import plugin
        self.assertTrue(plugin.register())
        self.transfer = importlib.import_module("integrations.ckptd.vllm.transfer")
        connect = mock.patch.object(self.transfer.CkptdWeightTransferEngine, "_connect",
                                    lambda engine, path, timeout_s: cpu_receiver(path, timeout_s))
        connect.start()
        self.addCleanup(connect.stop)
        self.daemons = []

    def daemon(self, slot_bytes=4096):
        d = FakeDaemon(slot_bytes=slot_bytes)
        self.addCleanup(d.close)
        self.daemons.append(d)
        return d

    def worker(self, daemon, model, model_config=PLAIN, reload="auto", draft=None):
        w = vs.Worker("ckptd", model, model_config, draft=draft)
        w.init_weight_transfer_engine({"socket_dir": daemon.dir, "timeout_s": TIMEOUT, "reload": reload})
        self.addCleanup(w.engine.shutdown)
        return w

    def update(self, w, update="u-1"):
        w.start_weight_update()
        w.update_weights({"update": update})
        w.finish_weight_update()

    def assert_holds(self, model, expected):
        for name, p in model.params.items():
            self.assertTrue(torch.equal(p.detach(), expected[name]), name)
            self.assertTrue(p.requires_grad, name)

    def test_the_plugin_registers_once_lazily(self):
        from integrations.ckptd.vllm import plugin
        self.assertTrue(plugin.register())  # a second load of the plugins in one process
        self.assertIn("ckptd", vs.WeightTransferEngineFactory._registry)

    def test_two_tensor_parallel_ranks_each_keep_their_shard(self):
        ckpt = vs.checkpoint()
        buckets = buckets_of(ckpt)
        ranks = []
        for rank in range(2):
            d = self.daemon()
            d.start(lambda d: d.push("u-1", buckets))
            model = vs.LlamaLike(rank=rank, size=2)
            self.update(self.worker(d, model))
            d.join()
            ranks.append(model)
        for model in ranks:
            self.assert_holds(model, model.expected(ckpt))
            self.assertEqual(model.load_calls, len(buckets))  # direct: one load_weights per bucket
        self.assertFalse(torch.equal(ranks[0].params["model.layers.0.mlp.down_proj.weight"],
                                     ranks[1].params["model.layers.0.mlp.down_proj.weight"]))

    def test_a_quantized_model_reloads_layerwise_processed_once_from_copies(self):
        # Layerwise reload keeps what it is given until the layer is complete, while the fake
        # daemon rewrites each slot after its ack (2 slots, 6 buckets): views would be overwritten.
        ckpt, ckpt2 = vs.checkpoint(seed=1), vs.checkpoint(seed=2)
        buckets = buckets_of(ckpt, per_bucket=3)
        d = self.daemon()
        d.start(lambda d: (d.push("u-1", buckets), d.push("u-2", buckets_of(ckpt2, per_bucket=2, seed=5))))
        model = vs.LlamaLike(rank=1, size=2)
        w = self.worker(d, model, QUANTIZED)
        self.update(w, "u-1")
        self.assert_holds(model, model.expected(ckpt, processed=True))
        self.assertEqual(model.reload_stats["processed"], 8)  # 4 parameters in each of 2 layers, once
        self.assertTrue(model.finalized)
        self.update(w, "u-2")  # processed from the new checkpoint, not twice over
        d.join()
        self.assert_holds(model, model.expected(ckpt2, processed=True))

    def test_reload_direct_is_taken_when_asked(self):
        ckpt = vs.checkpoint(seed=3)
        d = self.daemon()
        d.start(lambda d: d.push("u-1", buckets_of(ckpt)))
        model = vs.LlamaLike()
        self.update(self.worker(d, model, QUANTIZED, reload="direct"))
        d.join()
        self.assert_holds(model, model.expected(ckpt))
        self.assertFalse(hasattr(model, "reload_stats"))

    def test_a_model_that_needs_layerwise_reload_is_refused_without_it(self):
        d = self.daemon()
        d.start(lambda d: None)
        w = self.worker(d, vs.LlamaLike(), types.SimpleNamespace(quantization=None, use_mla=True))
        without = {"vllm.model_executor.model_loader": types.ModuleType("vllm.model_executor.model_loader"),
                   "vllm.model_executor.model_loader.reload": None}
        with mock.patch.dict(sys.modules, without), \
                self.assertRaisesRegex(RuntimeError, "a quantized or MLA model takes new weights only through "
                                       "vLLM's layerwise reload"):
            w.start_weight_update()
        d.join()

    def test_the_draft_model_takes_an_update_of_its_own(self):
        ckpt = vs.checkpoint(layers=1, seed=4)
        d = self.daemon()
        d.start(lambda d: d.push("u-1", buckets_of(ckpt)))
        target, draft = vs.LlamaLike(), vs.LlamaLike(layers=1)
        w = self.worker(d, target, draft=draft)
        w.start_weight_update(draft=True)
        w.update_weights({"update": "u-1"})
        w.finish_weight_update()
        d.join()
        self.assert_holds(draft, draft.expected(ckpt))
        self.assertEqual(target.load_calls, 0)
        self.assertIs(w.engine.model, target)  # the worker reset the target at finish

    def test_a_failed_update_raises_and_the_next_one_works(self):
        ckpt = vs.checkpoint()
        buckets = buckets_of(ckpt)

        d = self.daemon()
        d.start(fails_then_succeeds(buckets))
        model = vs.LlamaLike()
        w = self.worker(d, model)
        real = model.load_weights
        model.load_weights = mock.Mock(side_effect=RuntimeError("CUDA out of memory"))
        w.start_weight_update()
        with self.assertRaisesRegex(cr.ReceiveError, "RuntimeError: CUDA out of memory"):
            w.update_weights({"update": "u-1"})
        self.assertFalse(w.active)  # the worker closed the session
        model.load_weights = real
        self.update(w, "u-2")  # same connection
        d.join()
        self.assert_holds(model, model.expected(ckpt))
        self.assertEqual(w.engine.last_summary["update"], "u-2")

    def test_a_failed_update_finishes_the_layerwise_reload_itself(self):
        # vLLM's worker closes its update when update_weights raises, and calls no finish
        ckpt = vs.checkpoint(seed=6)
        buckets = buckets_of(ckpt)

        d = self.daemon()
        d.start(fails_then_succeeds(buckets))
        model = vs.LlamaLike()
        w = self.worker(d, model, QUANTIZED)
        real = model.load_weights
        model.load_weights = mock.Mock(side_effect=RuntimeError("bad shard"))
        w.start_weight_update()
        with self.assertRaisesRegex(cr.ReceiveError, "bad shard"):
            w.update_weights({"update": "u-1"})
        self.assertTrue(model.finalized)
        model.load_weights = real
        self.update(w, "u-2")
        d.join()
        self.assert_holds(model, model.expected(ckpt, processed=True))

    def test_an_update_other_than_the_one_asked_is_refused_before_anything_loads(self):
        ckpt = vs.checkpoint()
        told = []

        def script(d):
            d.send({"op": "begin", "update": "u-7", "checkpoint": "m@7", "tensors": 16, "buckets": 1})
            told.append(d.recv())
            d.send({"op": "abort", "update": "u-7", "reason": "receiver failed"})
            d.push("u-8", buckets_of(ckpt))

        d = self.daemon()
        d.start(script)
        model = vs.LlamaLike()
        w = self.worker(d, model, QUANTIZED)
        w.start_weight_update()
        with self.assertRaisesRegex(cr.ReceiveError, "update u-7 began, but this receiver was asked for update u-1"):
            w.update_weights({"update": "u-1"})
        self.assertEqual(model.load_calls, 0)
        self.assertTrue(model.finalized)  # the layerwise reload was finished, not left open
        self.assertIsNone(w.engine._load)
        self.assertEqual((told[0]["op"], told[0]["update"]), ("error", "u-7"))
        self.update(w, "u-8")  # the same connection takes the next one
        d.join()
        self.assert_holds(model, model.expected(ckpt, processed=True))

    def test_an_abort_before_begin_ends_the_wait(self):
        # the daemon failed before this receiver's update began (another rank never connected)
        d = self.daemon()
        d.start(lambda d: d.send({"op": "abort", "update": "u-3", "reason": "engine e has no receiver on GPU 1"}))
        w = self.worker(d, vs.LlamaLike())
        w.start_weight_update()
        with self.assertRaisesRegex(cr.UpdateAborted, "update u-3 aborted: engine e has no receiver on GPU 1"):
            w.update_weights({})
        d.join()

    def test_a_daemon_that_never_pushes_times_out_and_is_dropped(self):
        d = self.daemon()
        d.start(lambda d: None)
        w = vs.Worker("ckptd", vs.LlamaLike(), PLAIN)
        w.init_weight_transfer_engine({"socket_dir": d.dir, "timeout_s": 0.2})
        self.addCleanup(w.engine.shutdown)
        w.start_weight_update()
        with self.assertRaises(TimeoutError):
            w.update_weights({})
        self.assertIsNone(w.engine._receiver)  # the next update connects again
        d.join()

    def test_init_info_is_checked(self):
        d = self.daemon()
        w = vs.Worker("ckptd", vs.LlamaLike(), PLAIN)
        for info, message in (
            ({}, "init_info needs socket_dir"),
            ({"socket_dir": d.dir, "timeout_s": 0}, "timeout_s must be a positive number of seconds, not 0"),
            ({"socket_dir": d.dir, "reload": "fast"}, "reload 'fast' is not one of auto, direct, layerwise"),
            ({"socket_dir": d.dir, "bucket": 1}, "Invalid init_info for CkptdWeightTransferEngine"),
        ):
            with mock.patch.dict(os.environ, {"CKPTD_SOCKET_DIR": ""}), self.assertRaisesRegex(ValueError, message):
                w.init_weight_transfer_engine(info)

    def test_socket_dir_from_the_environment(self):
        d = self.daemon()
        d.start(lambda d: None)
        w = vs.Worker("ckptd", vs.LlamaLike(), PLAIN)
        with mock.patch.dict(os.environ, {"CKPTD_SOCKET_DIR": d.dir}):
            w.init_weight_transfer_engine({})
        self.assertEqual(w.engine._receiver.socket_path, d.path)
        w.engine.shutdown()
        d.join()

    def test_trainers_push_to_the_daemon(self):
        with self.assertRaisesRegex(NotImplementedError, "trainers push to the daemon"):
            self.transfer.CkptdWeightTransferEngine.trainer_send_weights(iter(()), {})


@needs_torch
class WorkerExtensionTest(unittest.TestCase):
    """The extension, for vLLM without weight transfer engines: one collective_rpc per update."""

    def setUp(self):
        from integrations import vllm_extension
        self.daemon = FakeDaemon()
        self.addCleanup(self.daemon.close)

        class Worker(vllm_extension.CkptdWorkerExtension):
            def __init__(self, model, model_config=PLAIN):
                self.model_runner = types.SimpleNamespace(model=model, model_config=model_config)
                self.paths = []

            def _ckptd_local_device(self):
                return 0

            def _ckptd_connect(self, socket_path, timeout_s):
                self.paths.append((socket_path, timeout_s))
                return cpu_receiver(socket_path, timeout_s)

        self.Worker = Worker

    def call(self, w, *args, **kwargs):
        with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}):
            out = w.ckptd_update(self.daemon.dir, *args, **kwargs)
        json.dumps(out)  # travels back through collective_rpc / HTTP
        return out

    def test_updates_through_load_weights_on_one_connection(self):
        ckpt1, ckpt2 = vs.checkpoint(seed=10), vs.checkpoint(seed=11)
        self.daemon.start(lambda d: (d.push("u-1", buckets_of(ckpt1)), d.push("u-2", buckets_of(ckpt2))))
        model = vs.LlamaLike(rank=0, size=2)
        w = self.Worker(model)
        s1 = self.call(w, "30")  # HTTP's collective_rpc passes strings
        s2 = self.call(w)
        w.ckptd_close()
        self.daemon.join()
        for name, p in model.params.items():
            self.assertTrue(torch.equal(p.detach(), model.expected(ckpt2)[name]), name)
        self.assertEqual(w.paths, [(self.daemon.path, 30.0)])
        self.assertEqual((s1["ok"], s1["update"], s1["tensors"], s1["reload"]), (True, "u-1", 16, "direct"))
        self.assertEqual((s2["ok"], s2["update"]), (True, "u-2"))

    def test_a_quantized_model_goes_through_layerwise_reload_never_post_processing_twice(self):
        ckpt = vs.checkpoint(seed=12)
        post = []
        mods = vs.install()
        utils = types.ModuleType("vllm.model_executor.model_loader.utils")
        utils.process_weights_after_loading = lambda *a: post.append(a)
        mods[utils.__name__] = utils
        self.daemon.start(lambda d: d.push("u-1", buckets_of(ckpt)))
        model = vs.LlamaLike()
        w = self.Worker(model, QUANTIZED)
        with mock.patch.dict(sys.modules, mods):
            s = self.call(w)
        w.ckptd_close()
        self.daemon.join()
        self.assertEqual((s["ok"], s["reload"]), (True, "layerwise"), s)
        self.assertEqual(post, [])
        self.assertEqual(model.reload_stats["processed"], 8)
        for name, p in model.params.items():
            self.assertTrue(torch.equal(p.detach(), model.expected(ckpt, processed=True)[name]), name)

    def test_without_layerwise_reload_a_quantized_model_is_refused_untouched(self):
        self.daemon.start(lambda d: None)
        model = vs.LlamaLike()
        w = self.Worker(model, QUANTIZED)
        with mock.patch.dict(sys.modules, {"vllm": None}):
            s = self.call(w)
        w.ckptd_close()
        self.daemon.join()
        self.assertFalse(s["ok"])
        self.assertRegex(s["error"], "^RuntimeError: a quantized or MLA model takes new weights only through")
        self.assertEqual(model.load_calls, 0)

    def test_failure_is_returned_not_raised_and_the_next_update_works(self):
        ckpt = vs.checkpoint(seed=13)
        buckets = buckets_of(ckpt)

        def script(d):
            d.push("u-1", buckets, stop_after=1)
            d.recv()
            assert d.recv()["op"] == "error"
            d.send({"op": "abort", "update": "u-1", "reason": "x"})
            d.push("u-2", buckets)

        self.daemon.start(script)
        model = vs.LlamaLike()
        w = self.Worker(model)
        real = model.load_weights
        calls = []

        def second_fails(weights):
            calls.append(1)
            if len(calls) == 2:
                raise KeyError("model.layers.9.weight")
            return real(weights)
        model.load_weights = second_fails
        s = self.call(w)
        self.assertEqual(s, {"ok": False, "update": "u-1", "error": "KeyError: 'model.layers.9.weight'"})
        model.load_weights = real
        self.assertTrue(self.call(w)["ok"])
        w.ckptd_close()
        self.daemon.join()

    def test_bad_arguments_are_returned(self):
        self.daemon.start(lambda d: None)
        w = self.Worker(vs.LlamaLike())
        self.assertEqual(self.call(w, "soon")["error"], "ValueError: timeout_s must be a number of seconds, not 'soon'")
        self.assertEqual(self.call(w, "-1")["error"], "ValueError: timeout_s must be positive, not '-1'")
        self.assertEqual(self.call(w, 5, "fast")["error"],
                         "ValueError: reload 'fast' is not one of auto, direct, layerwise")
        w.ckptd_close()
        self.daemon.join()

    def test_a_silent_daemon_times_out_and_the_connection_is_dropped(self):
        self.daemon.start(lambda d: None)
        w = self.Worker(vs.LlamaLike())
        s = self.call(w, "0.2")
        self.assertFalse(s["ok"])
        self.assertRegex(s["error"], "^TimeoutError")
        self.assertIsNone(w._ckptd_receiver)
        self.daemon.join()

    def test_socket_path_follows_cuda_visible_devices(self):
        os.rename(self.daemon.path, os.path.join(self.daemon.dir, "gpu-5.sock"))
        self.daemon.path = os.path.join(self.daemon.dir, "gpu-5.sock")
        self.daemon.start(lambda d: None)
        w = self.Worker(vs.LlamaLike())
        with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": "5,7"}):
            welcome = w.ckptd_connect(self.daemon.dir)
        w.ckptd_close()
        self.daemon.join()
        self.assertEqual(welcome["socket"], self.daemon.path)
        self.assertEqual(welcome["op"], "welcome")


if __name__ == "__main__":
    unittest.main()
