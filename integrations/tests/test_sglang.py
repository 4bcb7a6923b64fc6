"""Tests of the SGLang adapter (integrations/ckptd/sglang/) against a fake daemon and stand-ins
for the parts of upstream SGLang it relies on: models whose `load_weights` behave as upstream's
where it matters, a scheduler that dies on any exception out of the loader, an EAGLE worker
that calls the loader for the draft model and then the target. Nothing of SGLang is needed.

    python3 -m unittest integrations.tests.test_sglang -v
"""
from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
from unittest import mock

from integrations import sglang_adapter
from integrations.ckptd import sglang
from integrations.ckptd.sglang import adapter, fused

from .fake_daemon import TIMEOUT, FakeDaemon, needs_torch, torch, torch_bytes

logging.getLogger("ckptd").addHandler(logging.NullHandler())  # failures are expected here

LOADER = "integrations.ckptd.sglang.custom_weight_loader"  # the repository checkout's path
WITH_DRAFT = "integrations.ckptd.sglang.custom_weight_loader_with_draft"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- stand-ins for upstream SGLang -------------------------------------------------------------

def dynamic_import(path):
    """As upstream's `dynamic_import` (python/sglang/srt/utils/common.py): the module by
    importlib, then the attribute."""
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"invalid import path: {path}")
    return getattr(importlib.import_module(module), attr)


def rank_tensors(body, tp_rank):
    """What upstream makes of a rank's `serialized_named_tensors` entry before calling the
    loader (ModelRunner.update_weights_from_tensor, model_executor/model_runner.py): base64,
    unpickled, then rebuilt as a list of (name, tensor) pairs."""
    payload = base64.b64decode(body["serialized_named_tensors"][tp_rank])
    return [(name, t) for name, t in pickle.loads(payload)]


class SchedulerStandIn:
    """One TP rank's scheduler handling `update_weights_from_tensor`, as upstream does.
    ModelRunner.update_weights_from_tensor (python/sglang/srt/model_executor/model_runner.py)
    checks load_format against the --custom-weight-loader list, calls the loader, answers
    (True, "Success") whatever it returned, and has no try/except; nothing above it catches
    either, and run_scheduler_process (python/sglang/srt/managers/scheduler.py) answers any
    exception with "Scheduler hit an exception" and a SIGQUIT that kills the server: here it
    records the death, and every later request fails the test."""

    def __init__(self, model, custom_weight_loader=(LOADER,), tp_rank=0):
        self.model, self.custom_weight_loader, self.tp_rank = model, custom_weight_loader, tp_rank
        self.died = None

    def update_weights_from_tensor(self, body):
        if self.died is not None:
            raise AssertionError(f"the scheduler died earlier: {self.died!r}")
        try:
            named_tensors = rank_tensors(body, self.tp_rank)
            load_format = body["load_format"]
            if load_format not in self.custom_weight_loader:
                raise NotImplementedError(f"Unknown load_format={load_format}")
            dynamic_import(load_format)(self.model, named_tensors)
            return {"success": True, "message": "Success"}
        except Exception as e:  # noqa: BLE001 - "Scheduler hit an exception", then SIGQUIT
            self.died = e
            return None


class EagleWorkerStandIn:
    """EAGLEWorker.update_weights_from_tensor (python/sglang/srt/speculative/eagle_worker.py):
    this rank's entry is deserialized once, then the draft model runner loads it and, that
    having succeeded (it always does with a custom loader), the target's: the same list and
    load_format, so the loader runs twice, draft first."""

    def __init__(self, draft, target):
        self.draft, self.target = draft, target

    def update_weights_from_tensor(self, body):
        named_tensors = rank_tensors(body, 0)
        load = dynamic_import(body["load_format"])
        load(self.draft, named_tensors)
        load(self.target, named_tensors)


class ParamsModel:
    """A model whose load_weights indexes its parameters by name without checking, as older
    python/sglang/srt/models/qwen2.py does (`params_dict[name]`: a KeyError for a name it
    lacks), and copies each tensor at once."""

    def __init__(self, shapes, architectures=None):
        self.params = {name: torch.zeros(shape) for name, shape in shapes.items()}
        self.calls = []
        if architectures is not None:
            self.config = types.SimpleNamespace(architectures=architectures)

    def load_weights(self, weights):
        names = []
        for name, w in weights:
            names.append(name)
            self.params[name].copy_(w)
        self.calls.append(names)


class LlamaForCausalLM(ParamsModel):
    """A target model, by its upstream class name."""


class LlamaForCausalLMEagle3(ParamsModel):
    """An EAGLE3 draft model, by its upstream class name (python/sglang/srt/models/llama_eagle3.py)."""


class DeepseekLike:
    """DeepSeek V3's fusion of q_a_proj and kv_a_proj_with_mqa, as
    DeepseekV2WeightLoaderMixin.do_load_weights does it
    (python/sglang/srt/models/deepseek_common/deepseek_weight_loader.py; inline in
    models/deepseek_v2.py in older builds): each half waits in a dict local to the call (keeping
    the tensor it was given), the pair is concatenated on dim 0 into fused_qkv_a_proj_with_mqa
    once both are there, and a half still waiting when the call returns is dropped, silently."""

    def __init__(self, layers, q_rows=3, kv_rows=2, cols=4):
        self.config = types.SimpleNamespace(q_lora_rank=q_rows, architectures=["DeepseekV3ForCausalLM"])
        self.params = {}
        for layer in range(layers):
            attn = f"model.layers.{layer}.self_attn."
            self.params[attn + "fused_qkv_a_proj_with_mqa.weight"] = torch.zeros(q_rows + kv_rows, cols)
            self.params[attn + "fused_qkv_a_proj_with_mqa.weight_scale_inv"] = torch.zeros(2, 1)
            self.params[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.zeros(cols, cols)
        self.calls = []

    def load_weights(self, weights):
        cached_a_proj = {}
        names = []
        for name, w in weights:
            names.append(name)
            if "q_a_proj" in name or "kv_a_proj_with_mqa" in name:
                cached_a_proj[name] = w
                q_name = name.replace("kv_a_proj_with_mqa", "q_a_proj")
                kv_name = q_name.replace("q_a_proj", "kv_a_proj_with_mqa")
                if q_name in cached_a_proj and kv_name in cached_a_proj:
                    fused_weight = torch.cat([cached_a_proj.pop(q_name), cached_a_proj.pop(kv_name)], dim=0)
                    self.params[q_name.replace("q_a_proj", "fused_qkv_a_proj_with_mqa")].copy_(fused_weight)
            else:
                self.params[name].copy_(w)
        self.calls.append(names)


def deepseek_tensors(layers, q_rows=3, kv_rows=2, cols=4):
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer in range(layers):
        attn = f"model.layers.{layer}.self_attn."
        out[attn + "q_a_proj.weight"] = torch.randn(q_rows, cols, generator=g)
        out[attn + "kv_a_proj_with_mqa.weight"] = torch.randn(kv_rows, cols, generator=g)
        out[attn + "q_a_proj.weight_scale_inv"] = torch.randn(1, 1, generator=g)
        out[attn + "kv_a_proj_with_mqa.weight_scale_inv"] = torch.randn(1, 1, generator=g)
        out[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(cols, cols, generator=g)
    return out


class LlamaLike:
    """LlamaForCausalLM.load_weights (python/sglang/srt/models/llama.py): a name matching
    stacked_params_mapping is renamed to its stacked parameter and loaded by
    `param.weight_loader(param, w, shard_id)`, any other by its own weight_loader or the default
    one. The weight loaders do what QKVParallelLinear, MergedColumnParallelLinear and
    RowParallelLinear do (python/sglang/srt/layers/linear.py): this rank narrows the full
    tensor to its shard (q by tp_rank, k and v by tp_rank // kv-head replicas; gate and up by
    tp_rank; row-parallel on the input dim) and copies it into its slot of the parameter."""

    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, tp_rank, tp_size, hidden=8, heads=4, kv_heads=2, head_dim=2, inter=6):
        self.tp_rank = tp_rank
        self.q_size = heads // tp_size * head_dim
        self.kv_size = max(kv_heads // tp_size, 1) * head_dim
        self.kv_replicas = max(tp_size // kv_heads, 1)
        self.inter = inter // tp_size
        layer = "model.layers.0."
        self.params = {
            layer + "self_attn.qkv_proj.weight": self._param((self.q_size + 2 * self.kv_size, hidden),
                                                             self._qkv),
            layer + "self_attn.o_proj.weight": self._param((hidden, self.q_size), self._row),
            layer + "mlp.gate_up_proj.weight": self._param((2 * self.inter, hidden), self._merged),
            layer + "mlp.down_proj.weight": self._param((hidden, self.inter), self._row),
            "model.norm.weight": self._param((hidden,), None),
        }
        self.calls = []

    @staticmethod
    def _param(shape, weight_loader):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False)
        if weight_loader is not None:
            p.weight_loader = weight_loader
        return p

    def _qkv(self, param, w, shard_id):
        offset, size = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                        "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]
        shard = self.tp_rank if shard_id == "q" else self.tp_rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(w.narrow(0, shard * size, size))

    def _merged(self, param, w, index):
        size = self.inter
        param.data.narrow(0, index * size, size).copy_(w.narrow(0, self.tp_rank * size, size))

    def _row(self, param, w):
        size = param.shape[1]
        param.data.copy_(w.narrow(1, self.tp_rank * size, size))

    def load_weights(self, weights):
        names = []
        for name, w in weights:
            names.append(name)
            for param_name, weight_name, shard_id in self.stacked_params_mapping:
                if weight_name not in name:
                    continue
                name = name.replace(weight_name, param_name)
                param = self.params[name]
                param.weight_loader(param, w, shard_id)
                break
            else:
                param = self.params.get(name)
                if param is None:
                    continue  # upstream warns "Parameter ... not found"
                weight_loader = getattr(param, "weight_loader", None)
                if weight_loader is None:  # default_weight_loader
                    assert param.shape == w.shape
                    param.data.copy_(w)
                else:
                    weight_loader(param, w)
        self.calls.append(names)


# -- helpers -----------------------------------------------------------------------------------

DTYPE_NAMES = {} if torch is None else {torch.float32: "F32", torch.bfloat16: "BF16"}


def entries(tensors, names):
    """A bucket for FakeDaemon.push: (name, dtype, shape, bytes) of the named tensors."""
    return [(n, DTYPE_NAMES[tensors[n].dtype], list(tensors[n].shape), torch_bytes(tensors[n]))
            for n in names]


class SglangCase(unittest.TestCase):
    """Each test: no outcome yet, device 0, no CUDA_VISIBLE_DEVICES, the daemon's socket dir
    set by `start`, every connection closed and every fake daemon removed at the end."""

    def setUp(self):
        adapter._outcomes.clear()
        self.daemons = []
        env = mock.patch.dict(os.environ, {"CKPTD_RECEIVER_TIMEOUT_MS": str(TIMEOUT * 1000)})
        env.start()
        self.addCleanup(env.stop)
        for name in ("CUDA_VISIBLE_DEVICES", "CKPTD_SOCKET_DIR"):
            os.environ.pop(name, None)  # put back by env.stop
        device = mock.patch.object(adapter, "_current_device", return_value=0)
        device.start()
        self.addCleanup(device.stop)
        self.addCleanup(self._close)

    def _close(self):
        sglang.close()
        for d in self.daemons:
            d.close()

    def start(self, script, **kw):
        d = FakeDaemon(**kw)
        self.daemons.append(d)
        os.environ["CKPTD_SOCKET_DIR"] = d.dir
        return d.start(script)


# -- the loader never takes the scheduler down ------------------------------------------------

@needs_torch
class SchedulerSurvivesTest(SglangCase):
    def setUp(self):
        super().setUp()
        g = torch.Generator().manual_seed(1)
        self.tensors = {f"w{i}": torch.randn(2, 3, generator=g) for i in range(4)}
        self.good = [entries(self.tensors, ["w0", "w1"]), entries(self.tensors, ["w2", "w3"])]

    def assert_loaded(self, model):
        for name, t in self.tensors.items():
            self.assertTrue(torch.equal(model.params[name], t), name)

    def test_failed_updates_leave_the_scheduler_alive_and_the_next_update_works(self):
        unknown = torch.ones(2, 3)

        def first_connection(d):
            # u-1: the model raises (a name it does not have); the daemon aborts the update.
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c@1", "tensors": 1, "buckets": 1})
            d.send(d.write_bucket("u-1", 0, 0, entries({"nope.weight": unknown}, ["nope.weight"])))
            self.assertEqual(d.recv_for("u-1")["op"], "error")
            d.send({"op": "abort", "update": "u-1", "reason": "engine sglang-0 failed"})
            # u-2: aborted by the daemon after one bucket (another engine failed).
            d.push("u-2", self.good, stop_after=0)
            self.assertEqual(d.recv_for("u-2")["op"], "ack")
            d.send({"op": "abort", "update": "u-2", "reason": "engine vllm-1 failed"})
            d.push("u-3", self.good)
            d.conn.close()  # the daemon goes away

        model = ParamsModel({name: (2, 3) for name in self.tensors})
        scheduler = SchedulerStandIn(model)
        body = sglang.update_request(1, LOADER)
        d = self.start(first_connection)

        def update():
            reply = scheduler.update_weights_from_tensor(body)
            self.assertIsNone(scheduler.died)
            self.assertEqual(reply, {"success": True, "message": "Success"})  # whatever happened
            return sglang.last_outcome()

        out = update()
        self.assertEqual((out["ok"], out["update"], out["socket"]), (False, "u-1", d.path))
        self.assertRegex(out["error"], r"^ReceiveError: KeyError: 'nope.weight'")
        receiver = adapter._receivers[d.path]  # kept: the update failed, the connection did not

        out = update()
        self.assertEqual((out["ok"], out["update"], out["error"]),
                         (False, "u-2", "aborted: engine vllm-1 failed"))
        self.assertIs(adapter._receivers[d.path], receiver)

        out = update()
        self.assertEqual((out["ok"], out["update"], out["error"], out["summary"]["tensors"]),
                         (True, "u-3", None, 4))
        self.assert_loaded(model)
        self.assertIs(adapter._receivers[d.path], receiver)

        out = update()  # the daemon is gone
        self.assertEqual((out["ok"], out["update"]), (False, None))
        self.assertRegex(out["error"], r"^ConnectionError: the daemon closed ")
        self.assertNotIn(d.path, adapter._receivers)  # dropped: the next call reconnects
        d.join()

        with mock.patch.dict(os.environ):
            del os.environ["CKPTD_SOCKET_DIR"]
            out = update()
        self.assertEqual((out["ok"], out["socket"]), (False, None))
        self.assertRegex(out["error"], r"^RuntimeError: CKPTD_SOCKET_DIR is not set")

        for t in self.tensors.values():
            t.mul_(-1)
        again = [entries(self.tensors, ["w0", "w1"]), entries(self.tensors, ["w2", "w3"])]
        d.start(lambda d: d.push("u-4", again))  # the daemon is back, at the same path
        out = update()
        self.assertEqual((out["ok"], out["update"]), (True, "u-4"))
        self.assert_loaded(model)
        d.join()
        self.assertEqual([o["update"] for o in sglang.outcomes()], ["u-1", "u-2", "u-3", None, None, "u-4"])

    def test_no_daemon_at_the_socket_is_an_outcome(self):
        with tempfile.TemporaryDirectory(prefix="ckptd-test-") as empty:
            with mock.patch.dict(os.environ, {"CKPTD_SOCKET_DIR": empty}):
                scheduler = SchedulerStandIn(ParamsModel({}))
                scheduler.update_weights_from_tensor(sglang.update_request(1, LOADER))
        self.assertIsNone(scheduler.died)
        out = sglang.last_outcome()
        self.assertEqual((out["ok"], out["socket"]), (False, os.path.join(empty, "gpu-0.sock")))
        self.assertRegex(out["error"], r"^FileNotFoundError")

    def test_keyboard_interrupt_and_system_exit_pass(self):
        class Interrupted(ParamsModel):
            def load_weights(self, weights):
                raise KeyboardInterrupt

        d = self.start(lambda d: d.push("u-1", self.good))
        with self.assertRaises(KeyboardInterrupt):
            sglang.custom_weight_loader(Interrupted({}), [])
        self.assertNotIn(d.path, adapter._receivers)
        with self.assertRaises(ConnectionError):
            d.join()  # the receiver hung up instead of acking
        with mock.patch.object(adapter, "socket_path", side_effect=SystemExit(3)):
            with self.assertRaises(SystemExit):
                sglang.custom_weight_loader(ParamsModel({}), [])

    def test_the_loader_logs_the_failure_with_the_socket(self):
        def script(d):
            d.send({"op": "begin", "update": "u-1", "checkpoint": "c@1", "tensors": 2, "buckets": 1})
            d.send(d.write_bucket("u-1", 0, 0, self.good[0]))
            self.assertEqual(d.recv_for("u-1")["op"], "error")
            d.send({"op": "abort", "update": "u-1", "reason": "engine sglang-0 failed"})

        d = self.start(script)
        with self.assertLogs("ckptd.sglang", "ERROR") as logs:
            sglang.custom_weight_loader(ParamsModel({}), [])
        d.join()
        self.assertIn(f"update u-1 into ParamsModel from {d.path} failed here: KeyError: 'w0'",
                      "\n".join(logs.output))


# -- timeouts and where the socket is --------------------------------------------------------

@needs_torch
class TimeoutAndSocketTest(SglangCase):
    def test_a_daemon_that_never_pushes_times_out(self):
        release = threading.Event()

        def script(d):
            release.wait(3)
            d.conn.close()  # so that a loader without a timeout fails here rather than hangs

        d = self.start(script)
        os.environ["CKPTD_RECEIVER_TIMEOUT_MS"] = "200"
        started = time.monotonic()
        out = sglang.custom_weight_loader(ParamsModel({}), [])
        took = time.monotonic() - started
        release.set()
        self.assertLess(took, 2.5)
        self.assertEqual((out["ok"], out["update"]), (False, None))
        self.assertRegex(out["error"], r"^TimeoutError")
        self.assertNotIn(d.path, adapter._receivers)  # the daemon may still send: start afresh
        d.join()

    def test_a_daemon_silent_mid_update_times_out_and_the_connection_stays(self):
        release = threading.Event()
        bucket = entries({"w": torch.ones(2)}, ["w"])

        def script(d):
            d.push("u-1", [bucket, bucket], stop_after=0)
            release.wait(3)
            d.conn.close()

        d = self.start(script)
        os.environ["CKPTD_RECEIVER_TIMEOUT_MS"] = "300"
        out = sglang.custom_weight_loader(ParamsModel({"w": (2,)}), [])
        release.set()
        d.join()
        self.assertEqual((out["ok"], out["update"]), (False, "u-1"))
        self.assertRegex(out["error"], r"^ReceiveError: TimeoutError")
        self.assertIn(d.path, adapter._receivers)

    def test_receiver_timeout_from_the_daemons_setting(self):
        with mock.patch.dict(os.environ):
            del os.environ["CKPTD_RECEIVER_TIMEOUT_MS"]
            self.assertEqual(sglang.receiver_timeout(), 600.0)
            for value, seconds in (("250", 0.25), ("30000", 30.0), (" ", 600.0)):
                os.environ["CKPTD_RECEIVER_TIMEOUT_MS"] = value
                self.assertEqual(sglang.receiver_timeout(), seconds, value)
            for value in ("0", "-5", "1.5", "soon"):
                os.environ["CKPTD_RECEIVER_TIMEOUT_MS"] = value
                with self.assertRaisesRegex(ValueError, "CKPTD_RECEIVER_TIMEOUT_MS must be a whole "
                                            f"number of milliseconds, at least 1, not '{value}'"):
                    sglang.receiver_timeout()

    def test_a_bad_timeout_setting_is_an_outcome_before_connecting(self):
        with tempfile.TemporaryDirectory(prefix="ckptd-test-") as d:
            with mock.patch.dict(os.environ, {"CKPTD_SOCKET_DIR": d, "CKPTD_RECEIVER_TIMEOUT_MS": "soon"}):
                out = sglang.custom_weight_loader(ParamsModel({}), [])
        self.assertFalse(out["ok"])
        self.assertRegex(out["error"], "^ValueError: CKPTD_RECEIVER_TIMEOUT_MS must be")
        self.assertEqual(adapter._receivers, {})

    def test_the_socket_of_a_gpu_named_by_uuid(self):
        w = torch.arange(4.0)
        d = self.start(lambda d: d.push("u-1", [entries({"w": w}, ["w"])]))
        link = os.path.join(d.dir, "GPU-5f2e0000-1111-2222.sock")
        os.symlink("gpu-0.sock", link)  # as the daemon links each GPU's socket by UUID
        os.environ["CUDA_VISIBLE_DEVICES"] = "GPU-5f2e"  # a unique prefix, as CUDA accepts
        model = ParamsModel({"w": (4,)})
        out = sglang.custom_weight_loader(model, [])
        d.join()
        self.assertEqual((out["ok"], out["socket"]), (True, link))
        self.assertTrue(torch.equal(model.params["w"], w))

    def test_the_device_seam_picks_the_socket(self):
        env = {"CKPTD_SOCKET_DIR": "/run/ckptd", "CUDA_VISIBLE_DEVICES": "4,6"}
        with mock.patch.object(adapter, "_current_device", return_value=1), mock.patch.dict(os.environ, env):
            self.assertEqual(sglang.socket_path(), "/run/ckptd/gpu-6.sock")


# -- fused pairs, stacked params, tensor parallelism ------------------------------------------

@needs_torch
class FusedPairsTest(SglangCase):
    # One slot: each bucket overwrites the one before (after its ack), so a half held as a view
    # rather than a copy would load its successor's bytes.
    A0, A1 = "model.layers.0.self_attn.", "model.layers.1.self_attn."
    BUCKETS = [
        [A0 + "q_a_proj.weight", A0 + "kv_a_proj_with_mqa.weight_scale_inv",
         "model.layers.0.mlp.down_proj.weight"],
        [A0 + "kv_a_proj_with_mqa.weight", A1 + "q_a_proj.weight", A1 + "kv_a_proj_with_mqa.weight",
         A1 + "q_a_proj.weight_scale_inv", A1 + "kv_a_proj_with_mqa.weight_scale_inv",
         "model.layers.1.mlp.down_proj.weight"],
        [A0 + "q_a_proj.weight_scale_inv"],
    ]

    def push(self, tensors):
        return self.start(lambda d: d.push("u-1", [entries(tensors, b) for b in self.BUCKETS]), slots=1)

    def fused(self, tensors, layer, suffix):
        attn = f"model.layers.{layer}.self_attn."
        return torch.cat([tensors[attn + "q_a_proj" + suffix], tensors[attn + "kv_a_proj_with_mqa" + suffix]])

    def test_a_pair_split_over_buckets_lands_fused(self):
        tensors, model = deepseek_tensors(2), DeepseekLike(2)
        d = self.push(tensors)
        with self.assertNoLogs("ckptd.sglang", "WARNING"):
            out = sglang.custom_weight_loader(model, [])
        d.join()
        self.assertTrue(out["ok"], out)
        for layer in (0, 1):
            attn = f"model.layers.{layer}.self_attn.fused_qkv_a_proj_with_mqa"
            for suffix in (".weight", ".weight_scale_inv"):
                want = self.fused(tensors, layer, suffix)
                self.assertTrue(torch.equal(model.params[attn + suffix], want), attn + suffix)
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            self.assertTrue(torch.equal(model.params[name], tensors[name]))
        # One load_weights call per bucket; a held half goes right after the partner that releases it.
        a0 = self.A0
        self.assertEqual(model.calls, [
            ["model.layers.0.mlp.down_proj.weight"],
            [a0 + "kv_a_proj_with_mqa.weight", a0 + "q_a_proj.weight"] + self.BUCKETS[1][1:],
            [a0 + "q_a_proj.weight_scale_inv", a0 + "kv_a_proj_with_mqa.weight_scale_inv"],
        ])

    def test_without_grouping_the_model_drops_a_split_pair(self):
        tensors, model = deepseek_tensors(2), DeepseekLike(2)
        d = self.push(tensors)
        sglang.ckptd_update(model, d.path, rules=(), timeout=TIMEOUT)
        d.join()
        stale = model.params[self.A0 + "fused_qkv_a_proj_with_mqa.weight"]
        self.assertTrue(torch.equal(stale, torch.zeros(5, 4)))  # both halves dropped
        self.assertTrue(torch.equal(model.params[self.A1 + "fused_qkv_a_proj_with_mqa.weight"],
                                    self.fused(tensors, 1, ".weight")))

    def test_a_half_whose_partner_never_comes_is_loaded_at_the_end_with_a_warning(self):
        tensors = deepseek_tensors(1)
        lone = "model.layers.0.self_attn.q_a_proj.weight"
        buckets = [entries(tensors, [lone, "model.layers.0.mlp.down_proj.weight"])]
        d = self.start(lambda d: d.push("u-1", buckets))
        model = DeepseekLike(1)
        with self.assertLogs("ckptd.sglang", "WARNING") as logs:
            out = sglang.custom_weight_loader(model, [])
        d.join()
        self.assertTrue(out["ok"], out)
        self.assertEqual(model.calls, [["model.layers.0.mlp.down_proj.weight"], [lone]])
        self.assertIn("1 tensors came without their fused partner, loaded alone at the end of the "
                      f"update: {lone}", "\n".join(logs.output))

    def test_a_deepseek_without_q_lora_rank_fuses_nothing(self):
        lite = types.SimpleNamespace(config=types.SimpleNamespace(q_lora_rank=None))
        v3 = types.SimpleNamespace(config=types.SimpleNamespace(q_lora_rank=1536))
        self.assertEqual(fused.rules_for(lite), ())
        self.assertEqual(fused.rules_for(v3), fused.DEFAULT_RULES)
        self.assertEqual(fused.rules_for(object()), fused.DEFAULT_RULES)


@needs_torch
class TensorParallelTest(SglangCase):
    def test_every_rank_keeps_its_shard_of_full_tensors_bit_exact(self):
        hidden, heads, kv_heads, head_dim, inter, tp = 8, 4, 2, 2, 6, 2
        g = torch.Generator().manual_seed(3)
        layer = "model.layers.0."

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(torch.bfloat16)

        full = {
            layer + "self_attn.q_proj.weight": randn(heads * head_dim, hidden),
            layer + "self_attn.k_proj.weight": randn(kv_heads * head_dim, hidden),
            layer + "self_attn.v_proj.weight": randn(kv_heads * head_dim, hidden),
            layer + "self_attn.o_proj.weight": randn(hidden, heads * head_dim),
            layer + "mlp.gate_proj.weight": randn(inter, hidden),
            layer + "mlp.up_proj.weight": randn(inter, hidden),
            layer + "mlp.down_proj.weight": randn(hidden, inter),
            "model.norm.weight": randn(hidden),
        }
        names = list(full)
        # q, k and v (and gate, up) in different buckets: each shard loads on its own.
        buckets = [[names[0], names[4]], [names[1], names[7]], [names[2], names[5], names[3], names[6]]]
        models = []
        for rank in range(tp):
            d = self.start(lambda d: d.push("u-1", [entries(full, b) for b in buckets]))
            models.append(LlamaLike(rank, tp, hidden, heads, kv_heads, head_dim, inter))
            out = sglang.custom_weight_loader(models[rank], [])
            d.join()
            self.assertTrue(out["ok"], out)

        def rows(name, rank, parts):
            return full[layer + name].chunk(parts, dim=0)[rank]

        def cols(name, rank, parts):
            return full[layer + name].chunk(parts, dim=1)[rank]

        for rank, model in enumerate(models):
            expected = {
                layer + "self_attn.qkv_proj.weight": torch.cat(
                    [rows("self_attn.q_proj.weight", rank, tp), rows("self_attn.k_proj.weight", rank, tp),
                     rows("self_attn.v_proj.weight", rank, tp)]),
                layer + "self_attn.o_proj.weight": cols("self_attn.o_proj.weight", rank, tp),
                layer + "mlp.gate_up_proj.weight": torch.cat(
                    [rows("mlp.gate_proj.weight", rank, tp), rows("mlp.up_proj.weight", rank, tp)]),
                layer + "mlp.down_proj.weight": cols("mlp.down_proj.weight", rank, tp),
                "model.norm.weight": full["model.norm.weight"],
            }
            for name, want in expected.items():
                self.assertEqual(torch_bytes(model.params[name]), torch_bytes(want), f"rank {rank}: {name}")
            self.assertEqual(model.calls, buckets)
        self.assertNotEqual(torch_bytes(models[0].params[layer + "self_attn.qkv_proj.weight"]),
                            torch_bytes(models[1].params[layer + "self_attn.qkv_proj.weight"]))


# -- speculative decoding: the draft model ---------------------------------------------------

@needs_torch
class DraftModelTest(SglangCase):
    def setUp(self):
        super().setUp()
        self.target_shapes = {"model.layers.0.weight": (2, 2), "model.norm.weight": (2,),
                              "lm_head.weight": (4, 2)}
        self.draft_shapes = {"model.fc.weight": (2, 4), "model.norm.weight": (2,), "lm_head.weight": (3, 2)}
        g = torch.Generator().manual_seed(5)
        self.target_w = {n: torch.randn(*s, generator=g) for n, s in self.target_shapes.items()}
        self.draft_w = {n: torch.randn(*s, generator=g) for n, s in self.draft_shapes.items()}

    def test_the_draft_is_skipped_and_the_target_gets_the_update(self):
        for draft in (LlamaForCausalLMEagle3(self.draft_shapes),
                      ParamsModel(self.draft_shapes, architectures=["DeepseekV3ForCausalLMNextN"])):
            with self.subTest(draft=type(draft).__name__):
                adapter._outcomes.clear()
                d = self.start(lambda d: d.push("u-1", [entries(self.target_w, list(self.target_w))]))
                # One update only: a draft that consumed it would leave the target waiting.
                os.environ["CKPTD_RECEIVER_TIMEOUT_MS"] = "2000"
                target = LlamaForCausalLM(self.target_shapes)
                EagleWorkerStandIn(draft, target).update_weights_from_tensor(
                    sglang.update_request(1, LOADER, disable_draft_model=False))
                d.join()
                skipped, loaded = sglang.outcomes()
                self.assertEqual((skipped["ok"], skipped["skipped"], skipped["update"]),
                                 (True, f"draft model {type(draft).__name__}", None))
                self.assertEqual((loaded["ok"], loaded["update"]), (True, "u-1"))
                self.assertEqual(draft.calls, [])
                for name, t in self.target_w.items():
                    self.assertTrue(torch.equal(target.params[name], t), name)
                sglang.close()

    def test_with_draft_loads_both_from_two_updates(self):
        def script(d):
            d.push("u-draft", [entries(self.draft_w, list(self.draft_w))])
            d.push("u-target", [entries(self.target_w, list(self.target_w))])

        d = self.start(script)
        draft, target = LlamaForCausalLMEagle3(self.draft_shapes), LlamaForCausalLM(self.target_shapes)
        EagleWorkerStandIn(draft, target).update_weights_from_tensor(
            sglang.update_request(1, WITH_DRAFT, disable_draft_model=False))
        d.join()
        self.assertEqual([(o["ok"], o["update"]) for o in sglang.outcomes()],
                         [(True, "u-draft"), (True, "u-target")])
        for model, weights in ((draft, self.draft_w), (target, self.target_w)):
            for name, t in weights.items():
                self.assertTrue(torch.equal(model.params[name], t), name)

    def test_is_draft_model(self):
        def named(cls_name, architectures=None):
            model = type(cls_name, (), {})()
            if architectures is not None:
                model.config = types.SimpleNamespace(architectures=architectures)
            return model

        table = [
            (named("LlamaForCausalLMEagle3"), True),
            (named("LlamaForCausalLMEagle"), True),
            (named("DeepseekV3ForCausalLMNextN"), True),
            (named("Qwen3NextForCausalLMMTP"), True),
            (named("DraftModel", ["DeepseekV3ForCausalLMNextN"]), True),
            (named("DraftModel", ["MiMoMTPModel"]), True),
            (named("LlamaForCausalLM"), False),
            (named("DeepseekV3ForCausalLM", ["DeepseekV3ForCausalLM"]), False),
            (named("Model", None), False),
            (named("Model", "LlamaForCausalLMEagle3"), False),  # not a list: no architectures
        ]
        for model, want in table:
            with self.subTest(model=type(model).__name__, config=getattr(model, "config", None)):
                self.assertEqual(sglang.is_draft_model(model), want)


# -- the grouping, without torch ---------------------------------------------------------------

class FusedGroupsTest(unittest.TestCase):
    def test_partner_table(self):
        a = "model.layers.3.self_attn."
        table = [
            (a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight"),
            (a + "kv_a_proj_with_mqa.weight_scale_inv", a + "q_a_proj.weight_scale_inv"),
            (a + "q_a_layernorm.weight", None),
            (a + "kv_b_proj.weight", None),
            ("model.layers.3.mlp.gate_proj.weight", None),
        ]
        for name, want in table:
            self.assertEqual(fused.partner(name), want, name)
        self.assertIsNone(fused.partner(a + "q_a_proj.weight", ()))

    def test_take_holds_copies_until_the_partner_comes(self):
        rules = (("a.", "b."),)
        memory = bytearray(b"1234")
        view = memoryview(memory)
        groups = fused.FusedGroups(rules)
        self.assertEqual(groups.take([("x.a.w", view[0:2]), ("y", view[2:4])]), [("y", view[2:4])])
        self.assertEqual(groups.held, ["x.a.w"])
        memory[0:2] = b"99"  # the daemon rewrites the slot after the ack
        ready = groups.take([("x.b.w", view[2:4]), ("z.b.w", view[0:1]), ("z.a.w", view[1:2])])
        self.assertEqual([(n, bytes(v)) for n, v in ready],
                         [("x.b.w", b"34"), ("x.a.w", b"12"), ("z.b.w", b"9"), ("z.a.w", b"9")])
        self.assertEqual(groups.held, [])
        groups.take([("q.b.w", view[0:1])])
        self.assertEqual(groups.release(), [("q.b.w", b"9")])
        self.assertEqual((groups.held, groups.release()), ([], []))

    def test_grouped_loader_calls_load_once_per_bucket_with_something_ready(self):
        calls = []
        apply, finish = fused.grouped_loader(calls.append, (("a.", "b."),))
        view = memoryview(b"abcd")
        apply([("x.a.w", view[0:1])])  # all held: no call
        apply([("y", view[1:2]), ("x.b.w", view[2:3])])
        finish()
        self.assertEqual([[n for n, _ in c] for c in calls], [["y", "x.b.w", "x.a.w"]])

    @needs_torch
    def test_copies_of_torch_views_are_clones(self):
        base = torch.arange(4.0)
        copy = fused.copy_view(base[1:3])
        base.zero_()
        self.assertEqual(copy.tolist(), [1.0, 2.0])


# -- the HTTP body, the import paths ----------------------------------------------------------

class RequestTest(unittest.TestCase):
    def test_empty_payload_is_what_the_daemon_sends(self):
        self.assertEqual(sglang.EMPTY_PAYLOAD, "gARdlC4=")
        self.assertEqual(pickle.loads(base64.b64decode(sglang.EMPTY_PAYLOAD, validate=True)), [])

    def test_update_request_body(self):
        body = sglang.update_request(2)
        self.assertEqual(body, {"serialized_named_tensors": ["gARdlC4=", "gARdlC4="],
                                "load_format": "ckptd.sglang.custom_weight_loader", "flush_cache": True,
                                "abort_all_requests": False, "disable_draft_model": True})
        self.assertEqual(json.loads(json.dumps(body)), body)
        body = sglang.update_request(1, LOADER, weight_version="step-7", flush_cache=False,
                                     disable_draft_model=False, abort_all_requests=True)
        self.assertEqual(body, {"serialized_named_tensors": ["gARdlC4="], "load_format": LOADER,
                                "flush_cache": False, "abort_all_requests": True,
                                "disable_draft_model": False, "weight_version": "step-7"})
        self.assertEqual(rank_tensors(body, 0), [])

    def test_update_request_rejects_a_bad_tp_size_or_load_format(self):
        for tp_size in (0, -1, True, 2.0, "2", None):
            with self.assertRaisesRegex(ValueError, "tp_size must be the server's tensor-parallel size, "
                                        f"an integer >= 1, not {tp_size!r}"):
                sglang.update_request(tp_size)
        with self.assertRaisesRegex(ValueError, "load_format must be the loader's dotted path"):
            sglang.update_request(1, "custom_weight_loader")


class ImportPathsTest(unittest.TestCase):
    def test_the_old_module_names_the_same_objects(self):
        for name in ("custom_weight_loader", "custom_weight_loader_with_draft", "ckptd_update", "close",
                     "_receivers", "last_outcome", "is_draft_model"):
            self.assertIs(getattr(sglang_adapter, name), getattr(adapter, name), name)
        self.assertIs(sglang.custom_weight_loader, adapter.custom_weight_loader)
        self.assertIs(dynamic_import("integrations.sglang_adapter.custom_weight_loader"),
                      adapter.custom_weight_loader)
        self.assertIs(dynamic_import(LOADER), adapter.custom_weight_loader)
        self.assertIs(dynamic_import(WITH_DRAFT), adapter.custom_weight_loader_with_draft)

    def test_imports_without_torch(self):
        code = ("import sys; sys.modules['torch'] = None; "
                "import integrations.ckptd.sglang as s, integrations.sglang_adapter as a; "
                "print(s.EMPTY_PAYLOAD, a.custom_weight_loader is s.custom_weight_loader)")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "gARdlC4= True"), out.stderr)


@needs_torch
class CkptdUpdateTest(SglangCase):
    def test_updates_reuse_one_connection(self):
        g = torch.Generator().manual_seed(9)
        t1 = {f"w{i}": torch.randn(3, generator=g) for i in range(3)}
        t2 = {name: -t for name, t in t1.items()}
        d = self.start(lambda d: (d.push("u-1", [entries(t1, ["w0"]), entries(t1, ["w1", "w2"])]),
                                  d.push("u-2", [entries(t2, list(t2))])))
        model = ParamsModel({name: (3,) for name in t1})
        finished = []
        s1 = sglang.ckptd_update(model, d.path, timeout=TIMEOUT, finish=lambda: finished.append(1))
        receiver = adapter._receivers[d.path]
        self.assertTrue(torch.equal(model.params["w1"], t1["w1"]))
        s2 = sglang.ckptd_update(model, d.path)
        d.join()
        self.assertIs(adapter._receivers[d.path], receiver)
        self.assertEqual((s1["update"], s1["tensors"], s2["update"], finished), ("u-1", 3, "u-2", [1]))
        for name, t in t2.items():
            self.assertTrue(torch.equal(model.params[name], t), name)

    def test_a_connection_loss_drops_the_receiver_and_raises(self):
        d = self.start(lambda d: d.conn.close())
        with self.assertRaises(ConnectionError):
            sglang.ckptd_update(ParamsModel({}), d.path, timeout=TIMEOUT)
        d.join()
        self.assertNotIn(d.path, adapter._receivers)


if __name__ == "__main__":
    unittest.main()
