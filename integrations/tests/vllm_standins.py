"""Stand-ins for the parts of vLLM that ckptd's vLLM side touches, written from vLLM's source
(up to v0.32) where their behaviour matters to ckptd; `install()` puts them in sys.modules.

- vllm/distributed/weight_transfer/base.py: WeightTransferEngine's constructor, parse_*_info
  (cls(**d); a TypeError becomes ValueError), update_weights (parse, receive_weights),
  the draft retargeting (set_weight_update_target / reset_weight_update_target).
- vllm/distributed/weight_transfer/factory.py: register_engine (lazy "module", "Class" form;
  a second registration of a name raises), create_engine(config, vllm_config, device, model).
- vllm/model_executor/model_loader/reload/layerwise.py: initialize_layerwise_reload wraps each
  parameter's weight_loader so that loads are *buffered, keeping the tensors given*, until the
  layer has all its elements; the layer is then processed (quantized) and copied into the
  original storage; finalize_layerwise_reload processes partial layers, restores untouched ones.
- vllm/v1/worker/gpu_worker.py: the worker's start/update/finish session around the engine.
- A model as vLLM's Llama-style models load (vllm/model_executor/models/llama.py load_weights:
  stacked_params_mapping q/k/v -> qkv_proj and gate/up -> gate_up_proj with shard ids), whose
  parallel layers' weight_loaders each keep their tensor-parallel rank's shard
  (vllm/model_executor/layers/linear.py: QKV/MergedColumnParallelLinear narrow the output dim,
  RowParallelLinear the input dim).
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import sys
import types
from typing import Any, Generic, TypeVar

import torch

# -- vllm.distributed.weight_transfer.base ------------------------------------------------------


@dataclasses.dataclass
class WeightTransferInitInfo(abc.ABC):  # noqa: B024 - empty, as upstream
    pass


@dataclasses.dataclass
class WeightTransferUpdateInfo(abc.ABC):  # noqa: B024
    pass


TInit = TypeVar("TInit", bound=WeightTransferInitInfo)
TUpdate = TypeVar("TUpdate", bound=WeightTransferUpdateInfo)


class WeightTransferEngine(abc.ABC, Generic[TInit, TUpdate]):
    init_info_cls: type
    update_info_cls: type
    supports_draft_weight_update = True

    def __init__(self, config: Any, vllm_config: Any, device: Any, model: Any) -> None:
        self.config, self.vllm_config = config, vllm_config
        self.parallel_config = vllm_config.parallel_config
        self.model_config = vllm_config.model_config
        self.device, self.model = device, model
        self._target = (model, self.model_config)

    def parse_init_info(self, d: dict) -> Any:
        try:
            return self.init_info_cls(**d)
        except TypeError as e:
            raise ValueError(f"Invalid init_info for {type(self).__name__}: {e}") from e

    def parse_update_info(self, d: dict) -> Any:
        try:
            return self.update_info_cls(**d)
        except TypeError as e:
            raise ValueError(f"Invalid update_info for {type(self).__name__}: {e}") from e

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def set_weight_update_target(self, model: Any, model_config: Any) -> None:
        self.model, self.model_config = model, model_config

    def reset_weight_update_target(self) -> None:
        self.model, self.model_config = self._target

    @abc.abstractmethod
    def init_transfer_engine(self, init_info: Any) -> None: ...

    @abc.abstractmethod
    def start_weight_update(self) -> None: ...

    @abc.abstractmethod
    def receive_weights(self, update_info: Any) -> None: ...

    @abc.abstractmethod
    def finish_weight_update(self) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    @abc.abstractmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None: ...


# -- vllm.distributed.weight_transfer.factory ---------------------------------------------------


class WeightTransferEngineFactory:
    _registry: dict[str, Any] = {}

    @classmethod
    def register_engine(cls, name: str, module_path_or_cls: Any, class_name: str | None = None) -> None:
        if name in cls._registry:
            raise ValueError(f"Weight transfer engine '{name}' is already registered.")
        if isinstance(module_path_or_cls, str):
            if class_name is None:
                raise ValueError("class_name is required with a module path")
            path = module_path_or_cls
            cls._registry[name] = lambda: getattr(importlib.import_module(path), class_name)
        else:
            cls._registry[name] = lambda: module_path_or_cls

    @classmethod
    def create_engine(cls, config: Any, vllm_config: Any, device: Any, model: Any) -> Any:
        if config.backend not in cls._registry:
            raise ValueError(f"Invalid weight transfer backend: {config.backend}. "
                             f"Available engines: {list(cls._registry)}")
        return cls._registry[config.backend]()(config, vllm_config, device, model)


# -- vllm.model_executor.model_loader.reload ----------------------------------------------------


def process(weight: torch.Tensor) -> torch.Tensor:
    """The stand-in quantization's processing of a loaded weight into its kernel form."""
    return weight * 2 + 1


class _Layer:
    """What layerwise reload tracks of one layer: its parameters, the loads it buffers."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.pending, self.loaded = params, [], 0
        self.total = sum(p.numel() for p in params)


def initialize_layerwise_reload(model: Any) -> None:
    model.reload_stats = {"processed": 0}
    for layer_params in model.layers_params():
        layer = _Layer(layer_params)
        for p in layer_params:
            original = p.weight_loader
            p.original_loader = original

            def buffered(param, loaded_weight, shard_id=None, _layer=layer, _orig=original):
                # kept as given until the layer is complete: the tensor must stay valid until then
                _layer.pending.append((param, loaded_weight, (shard_id,), _orig))
                rows = param.shard[shard_id][1] if shard_id is not None else param.shape[0]
                _layer.loaded += param.numel() // param.shape[0] * rows
                if _layer.loaded >= _layer.total:
                    _process_layer(model, _layer)
            p.weight_loader = buffered


def _process_layer(model: Any, layer: _Layer) -> None:
    staging = {id(p): torch.empty_like(p.data) for p in layer.params}
    for param, loaded_weight, args, original in layer.pending:
        holder = torch.nn.Parameter(staging[id(param)], requires_grad=False)
        holder.shard = param.shard  # what the loader narrows by
        original(holder, loaded_weight, *args)
    for p in layer.params:
        p.data.copy_(process(staging[id(p)]))  # into the original storage (CUDA graphs keep its address)
        model.reload_stats["processed"] += 1
    layer.pending.clear()
    layer.loaded = 0


def finalize_layerwise_reload(model: Any, model_config: Any) -> None:
    for layer_params in model.layers_params():
        for p in layer_params:
            p.weight_loader = p.original_loader
    model.finalized = True


# -- a vLLM-style model at a tensor-parallel rank --------------------------------------------------


def _shard_rows(rank: int, size: int):
    def loader(param: Any, w: torch.Tensor, shard_id: Any = None) -> None:
        rows = w.shape[0] // size
        start, length = param.shard.get(shard_id, (0, param.shape[0]))
        param.data[start:start + length].copy_(w.narrow(0, rank * rows, rows))
    return loader


def _shard_cols(rank: int, size: int):
    def loader(param: Any, w: torch.Tensor, shard_id: Any = None) -> None:
        cols = w.shape[1] // size
        param.data.copy_(w.narrow(1, rank * cols, cols))
    return loader


def _replicated(param: Any, w: torch.Tensor, shard_id: Any = None) -> None:
    param.data.copy_(w)


HIDDEN, Q, KV, INTER, VOCAB = 8, 8, 4, 12, 16


def checkpoint(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named full tensors of the model (float32), as a trainer would push them."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (Q, HIDDEN)), ("self_attn.k_proj", (KV, HIDDEN)),
                            ("self_attn.v_proj", (KV, HIDDEN)), ("self_attn.o_proj", (HIDDEN, Q)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))):
            t[f"{p}{name}.weight"] = torch.randn(*shape, generator=g)
    t["model.norm.weight"] = torch.randn(HIDDEN, generator=g)
    return t


class LlamaLike(torch.nn.Module):
    """A model at TP rank `rank` of `size`; its parameters require grad, as any torch module's."""

    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, layers: int = 2, rank: int = 0, size: int = 1) -> None:
        super().__init__()
        self.rank, self.size, self.n_layers = rank, size, layers
        self.load_calls = 0
        q, kv, inter = Q // size, KV // size, INTER // size
        self.params: dict[str, torch.nn.Parameter] = {}

        def param(name, shape, loader, shard=None):
            p = torch.nn.Parameter(torch.zeros(*shape))
            p.weight_loader, p.shard = loader, shard or {}
            self.params[name] = p
            self.register_parameter(name.replace(".", "__"), p)

        param("model.embed_tokens.weight", (VOCAB, HIDDEN), _replicated)
        for i in range(layers):
            pre = f"model.layers.{i}."
            param(pre + "self_attn.qkv_proj.weight", (q + 2 * kv, HIDDEN), _shard_rows(rank, size),
                  {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)})
            param(pre + "self_attn.o_proj.weight", (HIDDEN, q), _shard_cols(rank, size))
            param(pre + "mlp.gate_up_proj.weight", (2 * inter, HIDDEN), _shard_rows(rank, size),
                  {0: (0, inter), 1: (inter, inter)})
            param(pre + "mlp.down_proj.weight", (HIDDEN, inter), _shard_cols(rank, size))
        param("model.norm.weight", (HIDDEN,), _replicated)

    def layers_params(self) -> list[list[torch.nn.Parameter]]:
        return [[p for n, p in self.params.items() if n.startswith(f"model.layers.{i}.")] for i in range(self.n_layers)]

    def load_weights(self, weights: Any) -> set[str]:
        self.load_calls += 1
        loaded = set()
        with torch.no_grad():
            for name, w in weights:
                for fused, part, shard_id in self.stacked_params_mapping:
                    if part in name:
                        target = name.replace(part, fused)
                        p = self.params[target]
                        p.weight_loader(p, w, shard_id)
                        loaded.add(target)
                        break
                else:
                    p = self.params[name]
                    p.weight_loader(p, w)
                    loaded.add(name)
        return loaded

    def expected(self, ckpt: dict[str, torch.Tensor], processed: bool = False) -> dict[str, torch.Tensor]:
        """What each parameter must hold after loading `ckpt` at this rank."""
        r, s = self.rank, self.size

        def rows(t):
            n = t.shape[0] // s
            return t[r * n:(r + 1) * n]

        def cols(t):
            n = t.shape[1] // s
            return t[:, r * n:(r + 1) * n]
        out = {"model.embed_tokens.weight": ckpt["model.embed_tokens.weight"], "model.norm.weight": ckpt["model.norm.weight"]}
        for i in range(self.n_layers):
            pre = f"model.layers.{i}."
            layer = {
                pre + "self_attn.qkv_proj.weight": torch.cat([rows(ckpt[pre + f"self_attn.{x}_proj.weight"]) for x in "qkv"]),
                pre + "self_attn.o_proj.weight": cols(ckpt[pre + "self_attn.o_proj.weight"]),
                pre + "mlp.gate_up_proj.weight": torch.cat([rows(ckpt[pre + f"mlp.{x}_proj.weight"]) for x in ("gate", "up")]),
                pre + "mlp.down_proj.weight": cols(ckpt[pre + "mlp.down_proj.weight"]),
            }
            out.update({k: process(v) if processed else v for k, v in layer.items()})
        return out


# -- vllm.v1.worker.gpu_worker: the session around the engine --------------------------------------


class Worker:
    """The worker's weight-update RPCs (start_weight_update / update_weights / finish_weight_update,
    and the draft variant), around an engine made by the factory once the model is loaded."""

    def __init__(self, backend: str, model: Any, model_config: Any, draft: Any = None, device: Any = "cpu") -> None:
        vllm_config = types.SimpleNamespace(model_config=model_config, parallel_config=types.SimpleNamespace())
        config = types.SimpleNamespace(backend=backend)
        self.draft = draft
        self.engine = WeightTransferEngineFactory.create_engine(config, vllm_config, torch.device(device), model)
        self.active = False

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_transfer_engine(self.engine.parse_init_info(init_info))

    def start_weight_update(self, draft: bool = False) -> None:
        if self.active:
            raise RuntimeError("a weight update is already in progress")
        if draft:
            self.engine.set_weight_update_target(self.draft, types.SimpleNamespace(quantization=None))
        self.engine.start_weight_update()
        self.active = True

    def update_weights(self, update_info: dict) -> None:
        if not self.active:
            raise RuntimeError("start_weight_update was not called")
        try:
            self.engine.update_weights(update_info)
        except BaseException:
            self.active = False
            self.engine.reset_weight_update_target()
            raise

    def finish_weight_update(self) -> None:
        if not self.active:
            raise RuntimeError("no weight update in progress")
        self.engine.finish_weight_update()
        self.engine.reset_weight_update_target()
        self.active = False


def install() -> dict[str, types.ModuleType]:
    """The stand-in modules by name, for mock.patch.dict(sys.modules, install())."""
    names = ["vllm", "vllm.distributed", "vllm.distributed.weight_transfer",
             "vllm.distributed.weight_transfer.base", "vllm.distributed.weight_transfer.factory",
             "vllm.model_executor", "vllm.model_executor.model_loader",
             "vllm.model_executor.model_loader.reload"]
    mods = {n: types.ModuleType(n) for n in names}
    base = mods["vllm.distributed.weight_transfer.base"]
    for cls in (WeightTransferInitInfo, WeightTransferUpdateInfo, WeightTransferEngine):
        setattr(base, cls.__name__, cls)
    WeightTransferEngineFactory._registry = {"nccl": lambda: None}
    mods["vllm.distributed.weight_transfer.factory"].WeightTransferEngineFactory = WeightTransferEngineFactory
    reload = mods["vllm.model_executor.model_loader.reload"]
    reload.initialize_layerwise_reload = initialize_layerwise_reload
    reload.finalize_layerwise_reload = finalize_layerwise_reload
    mods["vllm.model_executor.model_loader"].reload = reload
    for n in names[1:]:  # parents know their children, as after a real import
        parent, _, child = n.rpartition(".")
        setattr(mods[parent], child, mods[n])
    # the ckptd modules that import vLLM must be imported afresh under the stand-ins
    for name in [m for m in sys.modules if m.endswith("ckptd.vllm.transfer")]:
        del sys.modules[name]
    return mods
