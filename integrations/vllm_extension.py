"""ckptd in vLLM: a worker extension that applies updates pushed by the ckptd daemon.

    vllm serve MODEL --worker-extension-cls integrations.vllm_extension.CkptdWorkerExtension
    (the repository root on PYTHONPATH), then, for each update, on every worker:
    llm.collective_rpc("ckptd_update", args=("/var/lib/ckptd/sockets",))
    or over HTTP (vLLM's dev endpoint):
    curl -X POST localhost:8000/collective_rpc -H 'content-type: application/json' \\
        -d '{"method": "ckptd_update", "args": ["/var/lib/ckptd/sockets"]}'

(the daemon's socketDir: `<stateDir>/sockets` by default, `/var/lib/ckptd/sockets` under the
systemd unit, `~/.local/state/ckptd/sockets` for a daemon started by hand; a daemon with
kind "vllm" engines passes its own.)

Each worker (one per GPU) connects to `<socket_dir>/gpu-<index>.sock`, index being its GPU's
host-wide index (see `physical_gpu_index`), and stays connected: the daemon's buffers stay
mapped between updates. `ckptd_connect` connects without waiting for an update, so the
daemon can count the receivers before it begins one.

Written against vLLM's documented contract only (`model.load_weights(weights=Iterable[tuple[
str, Tensor]])`, the worker's `model_runner`); nothing from vLLM is imported at module load.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from .ckptd import ReceiveError, Receiver, UpdateAborted, gpu_socket_path
from .ckptd.receiver import Batch

log = logging.getLogger("ckptd.vllm")


class CkptdWorkerExtension:
    """Mixed into vLLM's worker class: `self` is the worker, with `self.model_runner`."""

    _ckptd_receiver: Receiver | None = None
    model_runner: Any

    # -- seams (a test overrides these) ------------------------------------------------------

    def _ckptd_local_device(self) -> int:
        """This worker's CUDA device index inside the process (after CUDA_VISIBLE_DEVICES)."""
        import torch
        return torch.cuda.current_device()

    def _ckptd_connect(self, socket_path: str) -> Receiver:
        """A Receiver for this worker's GPU; the GPU's identity is checked against the daemon's
        announced UUID when the buffers are mapped."""
        return Receiver(socket_path, device=f"cuda:{self._ckptd_local_device()}",
                        name=f"vllm-{os.getpid()}-gpu{self._ckptd_local_device()}")

    # -- model access ------------------------------------------------------------------------

    def _ckptd_model(self) -> Any:
        runner = self.model_runner
        get_model = getattr(runner, "get_model", None)  # unwraps compiled / graph wrappers
        return get_model() if callable(get_model) else runner.model

    def _ckptd_post_load(self, model: Any) -> bool:
        """vLLM's processing after weights are loaded (repacking for quantization kernels,
        attention weights derived from loaded ones, ...), as at the end of a model load. Its
        module moved between vLLM versions; without it, loading alone is what vLLM's own
        weight-update examples do, which is right for unquantized models."""
        try:
            from vllm.model_executor.model_loader.utils import process_weights_after_loading
        except ImportError:
            return False
        runner = self.model_runner
        model_config = getattr(runner, "model_config", None) or getattr(self, "model_config", None)
        device = getattr(runner, "device", None) or getattr(self, "device", None)
        if model_config is None or device is None:
            return False
        process_weights_after_loading(model, model_config, device)
        return True

    # -- the RPC methods ---------------------------------------------------------------------

    def ckptd_connect(self, socket_dir: str) -> dict[str, Any]:
        """Connects this worker's receiver (once); returns the daemon's welcome."""
        if self._ckptd_receiver is None:
            path = gpu_socket_path(socket_dir, self._ckptd_local_device())
            self._ckptd_receiver = self._ckptd_connect(path)
            log.info("ckptd: connected to %s", path)
        r = self._ckptd_receiver
        return dict(r.welcome, socket=r.socket_path)

    def ckptd_update(self, socket_dir: str, post_process: bool = True) -> dict[str, Any]:
        """Receives and applies one update; returns its summary with "ok": True, or
        {"ok": False, "update", "error"} (errors are returned rather than raised, so a failed
        update never takes the engine down through the RPC)."""
        try:
            self.ckptd_connect(socket_dir)
            assert self._ckptd_receiver is not None
            model = self._ckptd_model()
            post = {"done": False}

            def apply(batch: Batch) -> None:
                model.load_weights(weights=iter(batch))

            def finish() -> None:
                if post_process:
                    post["done"] = self._ckptd_post_load(model)

            summary = self._ckptd_receiver.receive(apply, finish)
            return dict(summary, ok=True, post_processed=post["done"])
        except UpdateAborted as e:
            return {"ok": False, "update": e.update, "error": f"aborted: {e.reason}"}
        except ReceiveError as e:
            return {"ok": False, "update": e.update, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - connection lost, protocol error, mapping failed
            # The connection is unusable (daemon restarted, bad message): drop it, so the next
            # call reconnects and maps the daemon's current buffers.
            self.ckptd_close()
            return {"ok": False, "update": None, "error": f"{type(e).__name__}: {e}"}

    def ckptd_close(self) -> bool:
        """Disconnects (unmaps the daemon's buffers)."""
        if self._ckptd_receiver is not None:
            try:
                self._ckptd_receiver.close()
            finally:
                self._ckptd_receiver = None
        return True
