"""ckptd in SGLang: weight updates pushed by the ckptd daemon, through SGLang's custom weight
loader hook. Importable as `ckptd.sglang` (installed) or `integrations.ckptd.sglang` (from the
repository root); use one of them throughout a server, since each is its own module with its
own connections and outcomes.

Running SGLang with ckptd:

    CKPTD_SOCKET_DIR=/var/lib/ckptd/sockets \\
    python -m sglang.launch_server --model-path MODEL --tp 2 \\
        --custom-weight-loader ckptd.sglang.custom_weight_loader

CKPTD_SOCKET_DIR is the daemon's socket directory (`<stateDir>/sockets`: /var/lib/ckptd/sockets
under the systemd unit, ~/.local/state/ckptd/sockets for a daemon started by hand); each TP
rank connects to the socket of its own GPU there (by index, or by UUID when
CUDA_VISIBLE_DEVICES names GPUs by UUID). CKPTD_RECEIVER_TIMEOUT_MS, the daemon's setting of
that name, bounds how long a rank waits for each message of the daemon (default 600 s; read
when the rank connects).

--custom-weight-loader is a whitelist (several paths may follow it): the request's
`load_format` must be exactly one of its strings, or SGLang raises in the scheduler and the
server dies. `custom_weight_loader_with_draft` must be listed too to be usable.

For each update the daemon drives SGLang over HTTP: `POST /pause_generation`, then
`POST /update_weights_from_tensor` with the body of `update_request(tp_size)` (an empty tensor
list per rank; every rank then calls the loader, which receives the update from its socket),
then `POST /continue_generation` (the newest upstream builds may also want
`POST /begin_weight_update` before and `/end_weight_update` after; not verified). SGLang
answers success whatever the loader did: the daemon's own result for the update is the truth,
and `last_outcome()` says, in each rank's process, what its loader did.

Modules: adapter (the loader, `ckptd_update`), fused (keeping fused tensor pairs in one
`load_weights` call), request (the HTTP body). Nothing from SGLang is imported.

Written from upstream SGLang's source (sgl-project/sglang: a `python/sglang/version.py` of
0.5.3rc2, and main-branch code up to the msgspec `io_struct.py` and the weight-update sessions
of `scheduler_components/weight_updater.py`), against fakes that reproduce its loaders; it has
not been run against a real SGLang.
"""
from .adapter import (
    DEFAULT_TIMEOUT_S,
    Outcome,
    ckptd_update,
    close,
    custom_weight_loader,
    custom_weight_loader_with_draft,
    is_draft_model,
    last_outcome,
    outcomes,
    receiver_timeout,
    socket_path,
)
from .fused import DEFAULT_RULES, FusedGroups, grouped_loader, partner, rules_for
from .request import EMPTY_PAYLOAD, LOAD_FORMAT, update_request

__all__ = [
    "DEFAULT_RULES", "DEFAULT_TIMEOUT_S", "EMPTY_PAYLOAD", "LOAD_FORMAT", "FusedGroups", "Outcome",
    "ckptd_update", "close", "custom_weight_loader", "custom_weight_loader_with_draft",
    "grouped_loader", "is_draft_model", "last_outcome", "outcomes", "partner", "receiver_timeout",
    "rules_for", "socket_path", "update_request",
]
