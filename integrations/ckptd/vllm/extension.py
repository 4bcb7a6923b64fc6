"""ckptd in vLLM through a worker extension: for vLLM without weight transfer engines (before
0.25), or a server started without `--weight-transfer-config`.

    vllm serve MODEL --worker-extension-cls ckptd.vllm.extension.CkptdWorkerExtension
    (from the repository without installing: integrations.vllm_extension.CkptdWorkerExtension)

then, for each update, on every worker (a daemon with a `kind: "vllm"`, `api: "worker-extension"`
engine makes this call itself):
    llm.collective_rpc("ckptd_update", args=(socket_dir,), kwargs={"timeout_s": "600"})
    or over HTTP (vLLM's dev endpoint, VLLM_SERVER_DEV_MODE=1):
    curl -X POST localhost:8000/collective_rpc -H 'content-type: application/json' \\
        -d '{"method": "ckptd_update", "args": ["<socketDir>"], "kwargs": {"timeout_s": "600"}}'

(socket_dir: the daemon's socketDir, `<stateDir>/sockets` by default.) The HTTP endpoint passes
strings only (vllm/entrypoints/serve/dev/rpc/api_router.py), so the keyword arguments are
strings too. vLLM adds the extension to the worker's bases and refuses names the worker already
has (vllm/v1/worker/worker_base.py init_worker): every name here starts with `ckptd`.

Each worker connects to the daemon's socket for its GPU (by index, or by UUID when
CUDA_VISIBLE_DEVICES lists UUIDs) and stays connected: the daemon's buffers stay mapped between
updates. The update lands through load.WeightLoad: directly for unquantized models, through
vLLM's layerwise reload for quantized and MLA ones; `process_weights_after_loading` is never
run a second time.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from .. import ProtocolError, ReceiveError, Receiver, UpdateAborted, gpu_socket_path
from .load import WeightLoad

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

    def _ckptd_connect(self, socket_path: str, timeout_s: float) -> Receiver:
        """A Receiver for this worker's GPU; the GPU's identity is checked against the daemon's
        announced UUID when the buffers are mapped."""
        return Receiver(socket_path, device=f"cuda:{self._ckptd_local_device()}",
                        name=f"vllm-{os.getpid()}-gpu{self._ckptd_local_device()}", timeout=timeout_s)

    # -- model access ------------------------------------------------------------------------

    def _ckptd_model(self) -> Any:
        runner = self.model_runner
        get_model = getattr(runner, "get_model", None)  # unwraps compiled / graph wrappers
        return get_model() if callable(get_model) else runner.model

    def _ckptd_model_config(self) -> Any:
        return getattr(self.model_runner, "model_config", None) or getattr(self, "model_config", None)

    # -- the RPC methods ---------------------------------------------------------------------

    def ckptd_connect(self, socket_dir: str, timeout_s: str | float = 600) -> dict[str, Any]:
        """Connects this worker's receiver (once); returns the daemon's welcome."""
        if self._ckptd_receiver is None:
            path = gpu_socket_path(socket_dir, self._ckptd_local_device())
            self._ckptd_receiver = self._ckptd_connect(path, _seconds(timeout_s))
            log.info("ckptd: connected to %s", path)
        r = self._ckptd_receiver
        return dict(r.welcome, socket=r.socket_path)

    def ckptd_update(self, socket_dir: str, timeout_s: str | float = 600, reload: str = "auto",
                     update: str | None = None) -> dict[str, Any]:
        """Receives and applies one update; returns its summary with "ok": True, or
        {"ok": False, "update", "error"} (errors are returned rather than raised, so a failed
        update never takes the engine down through the RPC). timeout_s: how long to wait for
        each message of the daemon; reload: "auto", "direct" or "layerwise" (load.WeightLoad);
        update: the daemon's id of the update asked for (another one is refused)."""
        load: WeightLoad | None = None
        try:
            self.ckptd_connect(socket_dir, timeout_s)
            assert self._ckptd_receiver is not None
            device = getattr(self.model_runner, "device", None) or getattr(self, "device", None)
            load = WeightLoad(self._ckptd_model(), self._ckptd_model_config(), reload, device=device)
            load.begin()
            summary = self._ckptd_receiver.receive(load.apply, update=update or None, driven=True)
            load.end()
            return dict(summary, ok=True, reload="layerwise" if load.layerwise else "direct")
        except UpdateAborted as e:
            return {"ok": False, "update": e.update, "error": f"aborted: {e.reason}"}
        except ReceiveError as e:
            return {"ok": False, "update": e.update, "error": str(e)}
        except (OSError, ProtocolError) as e:
            # The connection is unusable (daemon restarted or silent, bad message): drop it, so
            # the next call reconnects and maps the daemon's current buffers.
            self.ckptd_close()
            return {"ok": False, "update": None, "error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # noqa: BLE001 - a bad argument, a model that cannot reload
            return {"ok": False, "update": None, "error": f"{type(e).__name__}: {e}"}
        finally:
            if load is not None:
                _end_quietly(load)

    def ckptd_close(self) -> bool:
        """Disconnects (unmaps the daemon's buffers)."""
        if self._ckptd_receiver is not None:
            try:
                self._ckptd_receiver.close()
            finally:
                self._ckptd_receiver = None
        return True


def _seconds(value: str | float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"timeout_s must be a number of seconds, not {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"timeout_s must be positive, not {value!r}")
    return seconds


def _end_quietly(load: WeightLoad) -> None:
    """Ends a layerwise reload left open by a failure (vLLM puts back what did not load)."""
    try:
        load.end()
    except Exception as e:  # noqa: BLE001 - the update's own error is the one to report
        log.error("ckptd: finishing the layerwise reload after a failure: %s", e)
