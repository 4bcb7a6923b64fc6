"""ckptd as a vLLM weight transfer engine (vLLM 0.25 and later: engines that own their update
lifecycle), so that vLLM's own update protocol drives ckptd's receiver:

    pip install ckptd        (the plugin registers the backend in every vLLM process)
    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "ckptd"}'

then, per update, vLLM's RL routes (vllm/entrypoints/serve/dev/rlhf/api_router.py), which a
daemon with a `kind: "vllm"` engine calls by itself:
    POST /init_weight_transfer_engine {"init_info": {"socket_dir": ..., "timeout_s": ..., "reload": "auto"}}
    POST /pause?mode=keep, POST /start_weight_update,
    POST /update_weights {"update_info": {"update": "<the daemon's update id>"}}  (while the daemon pushes)
    POST /finish_weight_update {"weight_version": "name@N"}, POST /reset_prefix_cache, POST /resume

Read against vllm/distributed/weight_transfer/base.py and factory.py, and the worker's calls in
vllm/v1/worker/gpu_worker.py: the factory builds the engine with (config, vllm_config, device,
model) once the model is loaded; the worker calls init_transfer_engine(parse_init_info(d)),
then per update start_weight_update(), update_weights(d) (parse_update_info, receive_weights,
synchronize) and finish_weight_update(). For a speculative-decoding draft model the worker
retargets `self.model` / `self.model_config` between start and finish
(start_draft_weight_update), so they are read at each call, never kept.

The receiver connects at init and stays connected: the daemon's buffers stay mapped between
updates; each bucket is acked as soon as the model has copied it. Not run against a real vLLM
(it cannot be installed here): tests drive it through stand-ins of the classes above.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from .. import ProtocolError, Receiver, Summary, gpu_socket_path
from .load import RELOADS, WeightLoad

log = logging.getLogger("ckptd.vllm")


@dataclass
class CkptdInitInfo(WeightTransferInitInfo):
    """socket_dir: the daemon's socketDir ("" : $CKPTD_SOCKET_DIR). timeout_s: how long the
    receiver waits for each message of the daemon. reload: see load.WeightLoad."""

    socket_dir: str = ""
    timeout_s: float = 600.0
    reload: str = "auto"

    def __post_init__(self) -> None:
        if not self.socket_dir:
            self.socket_dir = os.environ.get("CKPTD_SOCKET_DIR", "")
        if not self.socket_dir:
            raise ValueError("init_info needs socket_dir (the ckptd daemon's socketDir), or set CKPTD_SOCKET_DIR")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, not {self.timeout_s!r}")
        if self.reload not in RELOADS:
            raise ValueError(f"reload {self.reload!r} is not one of {', '.join(RELOADS)}")


@dataclass
class CkptdUpdateInfo(WeightTransferUpdateInfo):
    """update: the daemon's update id, checked against the one that arrives (None: any)."""

    update: str | None = None


class CkptdWeightTransferEngine(WeightTransferEngine[CkptdInitInfo, CkptdUpdateInfo]):
    init_info_cls = CkptdInitInfo
    update_info_cls = CkptdUpdateInfo
    supports_draft_weight_update = True

    _receiver: Receiver | None = None
    _init: CkptdInitInfo | None = None
    _load: WeightLoad | None = None
    last_summary: Summary | None = None

    def _connect(self, path: str, timeout_s: float) -> Receiver:
        """A receiver on `path` for this worker's device (a seam for tests)."""
        return Receiver(path, device=self.device, name=f"vllm-{os.getpid()}-{self.device}", timeout=timeout_s)

    def _socket_path(self, socket_dir: str) -> str:
        index = getattr(self.device, "index", None)
        return gpu_socket_path(socket_dir, index if index is not None else 0)

    def _ensure_connected(self) -> Receiver:
        if self._init is None:
            raise RuntimeError("init_weight_transfer_engine was not called")
        if self._receiver is None:
            path = self._socket_path(self._init.socket_dir)
            self._receiver = self._connect(path, self._init.timeout_s)
            log.info("ckptd: connected to %s", path)
        return self._receiver

    def init_transfer_engine(self, init_info: CkptdInitInfo) -> None:
        """Connects to the daemon's socket for this device; called again with the same socket
        directory, it keeps the connection (the daemon calls it before every update)."""
        if self._init is not None and self._init.socket_dir != init_info.socket_dir:
            self._close()
        self._init = init_info
        self._ensure_connected()

    def start_weight_update(self) -> None:
        assert self._init is not None, "init_weight_transfer_engine was not called"
        self._ensure_connected()
        self._load = WeightLoad(self.model, self.model_config, self._init.reload)
        self._load.begin()

    def receive_weights(self, update_info: CkptdUpdateInfo) -> None:
        """Receives one whole update from the daemon into the model (bucket by bucket). Raises
        on failure (vLLM answers the update_weights call with the error); the connection is
        dropped only when it cannot serve the next update."""
        if self._load is None:
            raise RuntimeError("receive_weights outside start_weight_update / finish_weight_update")
        receiver = self._ensure_connected()
        try:
            summary = receiver.receive(self._load.apply, update=update_info.update, driven=True)
        except BaseException as e:
            # vLLM's worker closes its update when this raises, without finish_weight_update:
            # the layerwise reload is finished here (vLLM keeps what loaded, restores the rest).
            self._finish_quietly()
            if isinstance(e, (OSError, ProtocolError)):  # daemon gone, silent or speaking nonsense
                self._close()  # reconnect next time
            raise
        self.last_summary = summary
        log.info("ckptd: update %s (%s): %d tensors in %.3f s", summary["update"], summary["checkpoint"],
                 summary["tensors"], summary["seconds"])

    def finish_weight_update(self) -> None:
        load, self._load = self._load, None
        if load is not None:
            load.end()

    def _finish_quietly(self) -> None:
        try:
            self.finish_weight_update()
        except Exception as e:  # noqa: BLE001 - the update's own error is the one to report
            log.error("ckptd: finishing the layerwise reload after a failure: %s", e)

    def shutdown(self) -> None:
        self._close()

    def _close(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.close()

    @staticmethod
    def trainer_send_weights(iterator: Any, trainer_args: Any) -> None:
        raise NotImplementedError("with ckptd, trainers push to the daemon (ckptd.trainer.push_shm / push_http)")
