"""The `vllm.general_plugins` entry point of the ckptd distribution.

vLLM calls every general plugin with no arguments in each of its processes (API server,
engine core, each worker before it builds its model: vllm/plugins/__init__.py
load_general_plugins, vllm/v1/worker/worker_base.py init_worker), so this must be cheap and
idempotent. It registers the "ckptd" weight transfer backend lazily (the module is imported
only where an engine is created), in a vLLM whose factory takes registrations
(vllm/distributed/weight_transfer/factory.py, vLLM 0.25 and later); elsewhere it does nothing.
"""
from __future__ import annotations

import logging

log = logging.getLogger("ckptd.vllm")

BACKEND = "ckptd"


def register() -> bool:
    """Registers the backend; returns whether it is registered now."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:
        log.debug("ckptd: this vLLM has no weight transfer engines; use the worker extension")
        return False
    registry = getattr(WeightTransferEngineFactory, "_registry", {})
    if BACKEND not in registry:  # a second load of the plugins in one process must not raise
        # __package__ is ckptd.vllm when installed, integrations.ckptd.vllm from the repository
        WeightTransferEngineFactory.register_engine(BACKEND, f"{__package__}.transfer", "CkptdWeightTransferEngine")
    return True
