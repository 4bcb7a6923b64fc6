"""How one update lands in a vLLM model, for both of ckptd's vLLM entry points (the weight
transfer engine and the worker extension).

Two ways, chosen per update from the model's configuration:
- direct: each bucket goes straight into `model.load_weights(pairs)`, which renames, fuses
  (stacked q/k/v, gate/up) and shards per tensor-parallel rank through each parameter's
  `weight_loader`, copying out of the daemon's buffers before the bucket is acked. Right for
  unquantized models, whose parameters keep the checkpoint's layout.
- layerwise: vLLM's reload for quantized and MLA models
  (vllm/model_executor/model_loader/reload/layerwise.py): `initialize_layerwise_reload(model)`
  restores each layer's parameters in checkpoint layout and wraps their loaders; loads are
  buffered until a layer has all its elements, then processed (quantized, MLA weights derived)
  and copied into the original storage, so CUDA graphs see the new values;
  `finalize_layerwise_reload(model, model_config)` processes what is left (attention layers
  last). `process_weights_after_loading` is never called by ckptd: vLLM runs it once per
  layer inside that reload.
  Layerwise reload keeps the tensors it is given until their layer is complete, but the
  daemon overwrites a bucket's buffer once the bucket is acked; so in this mode each tensor
  is copied first (one device-to-device copy), and vLLM holds the copy. With the daemon's
  `bucketOrder: "layers"` a layer's tensors arrive together, so the copies held at any time
  stay about one layer per GPU (docs/training/layerwise.md: load weights grouped by layer).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..receiver import Batch

log = logging.getLogger("ckptd.vllm")

RELOADS = ("auto", "direct", "layerwise")


def needs_layerwise(model_config: Any) -> bool:
    """Whether vLLM processes this model's weights after loading (quantized, or MLA attention
    whose absorbed weights derive from kv_b_proj): then only layerwise reload is right."""
    if model_config is None:
        return False
    return getattr(model_config, "quantization", None) is not None or bool(getattr(model_config, "use_mla", False))


def layerwise_module() -> Any:
    """vLLM's layerwise reload (vllm/model_executor/model_loader/reload/__init__.py exports
    initialize_layerwise_reload and finalize_layerwise_reload), or None in a vLLM without it."""
    try:
        from vllm.model_executor.model_loader import reload
    except ImportError:
        return None
    if not (hasattr(reload, "initialize_layerwise_reload") and hasattr(reload, "finalize_layerwise_reload")):
        return None
    return reload


class WeightLoad:
    """One update into `model`: begin(), then apply(batch) per bucket, then end().

    reload: "auto" (layerwise for quantized or MLA models, else direct), "direct" or
    "layerwise". A model that needs layerwise reload in a vLLM that has none is refused at
    begin(), before any weight is touched: loading it directly would leave the quantized
    kernels' weights unprocessed."""

    def __init__(self, model: Any, model_config: Any, reload: str = "auto", reloader: Any = None,
                 device: Any = None) -> None:
        if reload not in RELOADS:
            raise ValueError(f"reload {reload!r} is not one of {', '.join(RELOADS)}")
        self.model, self.model_config = model, model_config
        self.layerwise = reload == "layerwise" or (reload == "auto" and needs_layerwise(model_config))
        self._reloader = reloader
        self._device = device
        self._begun = False

    def _on_device(self) -> Any:
        """The worker's device as torch's default while layerwise reload makes tensors: vLLM's own
        workers before 0.25 wrap these calls so (vllm/v1/worker/gpu_worker.py), as the meta-device
        step allocates on the default device."""
        if self._device is None:
            return contextlib.nullcontext()
        import torch
        device = torch.device(self._device)
        return device if hasattr(device, "__enter__") else contextlib.nullcontext()  # torch < 2.0: no such context

    def begin(self) -> None:
        if not self.layerwise:
            return
        if self._reloader is None:
            self._reloader = layerwise_module()
        if self._reloader is None:
            what = "quantized or MLA" if needs_layerwise(self.model_config) else "this"
            raise RuntimeError(f"a {what} model takes new weights only through vLLM's layerwise reload "
                               "(vllm.model_executor.model_loader.reload), which this vLLM does not have")
        with self._on_device():
            self._reloader.initialize_layerwise_reload(self.model)
        self._begun = True

    def apply(self, batch: Batch) -> None:
        """One bucket into the model; the views are not kept (copies in layerwise mode)."""
        if self.layerwise:
            pairs = [(name, view.clone()) for name, view in batch]
        else:
            pairs = list(batch)
        with self._on_device() if self.layerwise else contextlib.nullcontext():
            self.model.load_weights(pairs)

    def end(self) -> None:
        """Finishes a layerwise reload (also after a failed update: vLLM then puts the old kernel
        tensors back into layers that loaded nothing, and processes the others)."""
        if self._begun:
            self._begun = False
            assert self._reloader is not None
            with self._on_device():
                self._reloader.finalize_layerwise_reload(self.model, self.model_config)
