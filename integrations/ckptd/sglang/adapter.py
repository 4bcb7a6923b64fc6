"""ckptd in SGLang: the custom weight loader, and one update into a model.

`ckptd_update(model, socket_path, ...)` receives one update into `model` (anything with
SGLang's `model.load_weights(Iterable[tuple[str, Tensor]])`), keeping one connection per
socket path for the life of the process, so the daemon's buffers stay mapped. It raises.

`custom_weight_loader(model, named_tensors)` is what SGLang calls (the package docstring says
how): it never raises into the scheduler, and records what happened (`last_outcome()`).
Nothing from SGLang is imported here.
"""
from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable
from typing import Any, TypedDict

from ..engine import gpu_socket_path
from ..errors import ReceiveError, UpdateAborted
from ..receiver import Finish, Receiver, Summary
from .fused import Rule, grouped_loader, rules_for

log = logging.getLogger("ckptd.sglang")

DEFAULT_TIMEOUT_S = 600.0
"""How long the receiver waits for each message of the daemon, unless
$CKPTD_RECEIVER_TIMEOUT_MS says otherwise."""

_receivers: dict[str, Receiver] = {}  # socket path -> Receiver, kept between updates


class Outcome(TypedDict):
    """What one call of the loader did. ok: the update was applied here, or skipped on purpose
    (`skipped` says why). update: the daemon's update id, where known. error: what failed.
    socket: the daemon's socket used, where known. summary: the receiver's summary."""

    ok: bool
    update: str | None
    error: str | None
    skipped: str | None
    socket: str | None
    summary: Summary | None


_outcomes: collections.deque[Outcome] = collections.deque(maxlen=64)


def last_outcome() -> Outcome | None:
    """The newest outcome of the loader in this process, or None before its first call."""
    return _outcomes[-1] if _outcomes else None


def outcomes() -> list[Outcome]:
    """The loader's last outcomes in this process (at most 64), oldest first."""
    return list(_outcomes)


# -- one update --------------------------------------------------------------------------------

def ckptd_update(model: Any, socket_path: str, device: Any = None, finish: Finish | None = None,
                 rules: Iterable[Rule] | None = None, **receiver_kwargs: Any) -> Summary:
    """Receives one update into `model`; returns the receiver's summary.

    Each bucket goes to one `model.load_weights(list)` call (a list, as SGLang's ModelRunner
    passes), except the halves of fused pairs whose partner is in a later bucket: those are
    copied and loaded with it (fused.py). device: the model's torch device (None: the GPU the
    daemon announces). finish: optional hook run after the last bucket. rules: the fused pairs
    (None: `rules_for(model)`; () to load every bucket as it is). receiver_kwargs (name,
    timeout, mapper) apply when the connection is first made.

    Raises what Receiver.receive raises; after UpdateAborted or ReceiveError the connection
    stays, after any other error (connection, protocol, timeout) it is dropped and the next
    call reconnects."""
    r = _receivers.get(socket_path)
    if r is None:
        r = _receivers[socket_path] = Receiver(socket_path, device=device, **receiver_kwargs)
    apply, finish_loading = grouped_loader(model.load_weights,
                                           rules_for(model) if rules is None else rules)

    def finish_all() -> None:
        finish_loading()
        if finish is not None:
            finish()

    try:
        return r.receive(apply, finish_all, driven=True)  # SGLang asked for the next update
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


# -- where the daemon is -----------------------------------------------------------------------

def _current_device() -> int:
    """This process's CUDA device: SGLang sets it to the rank's GPU before any loading
    (`ModelRunner.init_torch_distributed` calls `set_device(gpu_id)`,
    python/sglang/srt/model_executor/model_runner.py). The seam that tests replace."""
    import torch
    return torch.cuda.current_device()


def socket_path() -> str:
    """The daemon's socket for this process's GPU: under $CKPTD_SOCKET_DIR, by index or, when
    CUDA_VISIBLE_DEVICES names GPUs by UUID, by the daemon's `<uuid>.sock` link."""
    socket_dir = os.environ.get("CKPTD_SOCKET_DIR")
    if not socket_dir:
        raise RuntimeError("CKPTD_SOCKET_DIR is not set: set it, in the environment of the SGLang "
                           "server, to the ckptd daemon's socket directory")
    return gpu_socket_path(socket_dir, _current_device())


def receiver_timeout() -> float:
    """Seconds to wait for each message of the daemon: $CKPTD_RECEIVER_TIMEOUT_MS (the daemon's
    setting of that name, in ms), else DEFAULT_TIMEOUT_S. Never unbounded."""
    value = os.environ.get("CKPTD_RECEIVER_TIMEOUT_MS")
    if value is None or value.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        ms = int(value)
    except ValueError:
        ms = 0
    if ms < 1:
        raise ValueError(f"CKPTD_RECEIVER_TIMEOUT_MS must be a whole number of milliseconds, "
                         f"at least 1, not {value!r}")
    return ms / 1000


# -- the loader SGLang calls -------------------------------------------------------------------

def is_draft_model(model: Any) -> bool:
    """Whether `model` is a speculative-decoding draft: its class name, or an entry of its
    `config.architectures`, contains Eagle, NextN or MTP (any case). Upstream names them so:
    `LlamaForCausalLMEagle3` (python/sglang/srt/models/llama_eagle3.py), `DeepseekV3ForCausalLMNextN`
    (python/sglang/srt/models/deepseek_nextn.py), and the other `*Eagle*`, `*NextN*`, `*MTP*`
    classes under python/sglang/srt/models/."""
    names = [type(model).__name__]
    architectures = getattr(getattr(model, "config", None), "architectures", None)
    if isinstance(architectures, (list, tuple)):
        names += [a for a in architectures if isinstance(a, str)]
    return any(marker in n.lower() for n in names for marker in ("eagle", "nextn", "mtp"))


def custom_weight_loader(model: Any, named_tensors: Iterable[Any] = ()) -> Outcome:
    """SGLang's custom weight loader: receives one update from the ckptd daemon's socket for
    this process's GPU into `model`. Draft models are skipped (see
    `custom_weight_loader_with_draft`).

    Never raises an Exception: SGLang has no try/except between the loader and the scheduler's
    event loop (`ModelRunner.update_weights_from_tensor`, model_runner.py), and
    `run_scheduler_process` (python/sglang/srt/managers/scheduler.py) answers any exception
    with "Scheduler hit an exception" and a SIGQUIT that takes the whole server down.
    Failures are logged, with the socket path, and recorded: `last_outcome()`. SGLang discards
    the return value and answers the HTTP request with success whatever happened here; the
    daemon's own result for the update (GET /v1/updates/{id}) is the truth: a failure during an
    update is sent to the daemon, which fails the update, and a rank that could not connect is
    an engine missing there. KeyboardInterrupt and SystemExit pass.

    named_tensors: what SGLang deserialized from the request, ignored (the request carries an
    empty list per rank: request.py); the tensors come from the daemon."""
    return _load(model, named_tensors, with_draft=False)


def custom_weight_loader_with_draft(model: Any, named_tensors: Iterable[Any] = ()) -> Outcome:
    """As `custom_weight_loader`, but loads into draft models too. With EAGLE/MTP and
    `disable_draft_model: false`, older SGLang calls the loader for the draft model first and
    then for the target, with the same list (EAGLEWorker.update_weights_from_tensor,
    python/sglang/srt/speculative/eagle_worker.py), so the daemon must push two updates: the
    draft's, then the target's (the newest, session-based upstream goes target first, then
    draft: scheduler_components/weight_updater.py). Target names offered to an EAGLE3 draft may overwrite its
    `model.norm.weight` and fail on `lm_head` (llama_eagle3.py); NextN drafts keep only their
    own layer (deepseek_nextn.py). Usable only if listed in --custom-weight-loader too."""
    return _load(model, named_tensors, with_draft=True)


def _load(model: Any, named_tensors: Iterable[Any], with_draft: bool) -> Outcome:
    what = type(model).__name__
    if not with_draft and is_draft_model(model):
        log.info("ckptd: not loading into the draft model %s", what)
        return _record(ok=True, skipped=f"draft model {what}")
    if isinstance(named_tensors, (list, tuple)) and named_tensors:
        log.warning("ckptd: ignoring the %d tensors of the request: the weights come from the "
                    "daemon", len(named_tensors))
    path: str | None = None
    try:
        path = socket_path()
        index = _current_device()
        summary = ckptd_update(model, path, device=f"cuda:{index}", timeout=receiver_timeout(),
                               name=f"sglang-{os.getpid()}-gpu{index}")
    except UpdateAborted as e:
        log.warning("ckptd: update %s into %s from %s was aborted by the daemon: %s",
                    e.update, what, path, e.reason)
        return _record(ok=False, update=e.update, error=f"aborted: {e.reason}", socket=path)
    except ReceiveError as e:
        log.error("ckptd: update %s into %s from %s failed here: %s", e.update, what, path, e)
        return _record(ok=False, update=e.update, error=f"ReceiveError: {e}", socket=path)
    except Exception as e:  # noqa: BLE001 - anything else would take the scheduler down
        log.error("ckptd: update into %s from %s failed: %s: %s", what, path or "(no socket)",
                  type(e).__name__, e, exc_info=True)
        return _record(ok=False, error=f"{type(e).__name__}: {e}", socket=path)
    log.info("ckptd: update %s applied into %s from %s: %d tensors in %.3f s", summary["update"],
             what, path, summary["tensors"], summary["seconds"])
    return _record(ok=True, update=summary["update"], socket=path, summary=summary)


def _record(ok: bool, update: str | None = None, error: str | None = None,
            skipped: str | None = None, socket: str | None = None,
            summary: Summary | None = None) -> Outcome:
    outcome: Outcome = {"ok": ok, "update": update, "error": error, "skipped": skipped,
                        "socket": socket, "summary": summary}
    _outcomes.append(outcome)
    return outcome
