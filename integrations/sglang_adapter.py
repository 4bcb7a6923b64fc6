"""ckptd in SGLang: apply updates pushed by the ckptd daemon to an SGLang model.

`ckptd_update(model, socket_path, device)` receives one update into `model` (anything with
SGLang's `model.load_weights(Iterable[tuple[str, Tensor]])`), keeping one connection per
socket path for the life of the process, so the daemon's buffers stay mapped.

From a running server, through SGLang's custom weight loader hook:
    --custom-weight-loader integrations.sglang_adapter.custom_weight_loader
then `update_weights_from_tensor` with `load_format="integrations.sglang_adapter.custom_weight_loader"`
(and no tensors) makes every TP rank call it as `custom_weight_loader(model, named_tensors)`:
it ignores the tensors and receives one update from `$CKPTD_SOCKET_DIR/gpu-<index>.sock`.
Nothing from SGLang is imported here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from .ckptd import ReceiveError, Receiver, UpdateAborted, gpu_socket_path
from .ckptd.receiver import Batch, Finish, Summary

log = logging.getLogger("ckptd.sglang")

_receivers: dict[str, Receiver] = {}  # socket path -> Receiver, kept between updates


def ckptd_update(model: Any, socket_path: str, device: Any = None, finish: Finish | None = None,
                 **receiver_kwargs: Any) -> Summary:
    """Receives one update into `model`; returns the receiver's summary.

    device: the model's torch device (None: the GPU the daemon announces). finish: optional
    hook run after the last bucket. receiver_kwargs (name, timeout, mapper) apply when the
    connection is first made. Raises what Receiver.receive raises; after a connection or
    protocol error the connection is dropped and the next call reconnects."""
    r = _receivers.get(socket_path)
    if r is None:
        r = _receivers[socket_path] = Receiver(socket_path, device=device, **receiver_kwargs)

    def apply(batch: Batch) -> None:
        model.load_weights(iter(batch))

    try:
        return r.receive(apply, finish)
    except (UpdateAborted, ReceiveError):
        raise  # the update is dropped, the connection is still good
    except BaseException:
        close(socket_path)  # in an unknown state: the next call reconnects
        raise


def close(socket_path: str | None = None) -> None:
    """Closes one connection (or all)."""
    paths = [socket_path] if socket_path is not None else list(_receivers)
    for p in paths:
        r = _receivers.pop(p, None)
        if r is not None:
            r.close()


def custom_weight_loader(model: Any, named_tensors: Iterable[Any] = ()) -> Summary:
    """SGLang's custom weight loader signature. The tensors are not used: the weights come
    from the daemon's socket for this process's GPU under $CKPTD_SOCKET_DIR."""
    import torch
    socket_dir = os.environ.get("CKPTD_SOCKET_DIR")
    if not socket_dir:
        raise RuntimeError("set CKPTD_SOCKET_DIR to the ckptd daemon's socket directory")
    local = torch.cuda.current_device()
    summary = ckptd_update(model, gpu_socket_path(socket_dir, local), device=f"cuda:{local}")
    log.info("ckptd: update %s applied: %d tensors in %.3f s", summary["update"],
             summary["tensors"], summary["seconds"])
    return summary
