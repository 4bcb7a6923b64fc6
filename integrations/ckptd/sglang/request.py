"""The HTTP request that makes SGLang call the ckptd loader on every TP rank."""
from __future__ import annotations

import base64
import pickle
from typing import Any

LOAD_FORMAT = "ckptd.sglang.custom_weight_loader"
"""The loader's dotted path with the package installed; from a repository checkout it is
`integrations.ckptd.sglang.custom_weight_loader`. SGLang accepts a `load_format` only if it is
exactly one of the strings given to --custom-weight-loader."""

EMPTY_PAYLOAD = base64.b64encode(pickle.dumps([], protocol=4)).decode("ascii")
"""One rank's `serialized_named_tensors` entry: an empty list, pickled (protocol 4, as SGLang's
MultiprocessingSerializer does on Python <= 3.13) and base64-encoded: "gARdlC4=". SGLang
unpickles it into the `named_tensors` the loader ignores."""


def update_request(tp_size: int, load_format: str = LOAD_FORMAT, *,
                   weight_version: str | None = None, flush_cache: bool = True,
                   disable_draft_model: bool = True, abort_all_requests: bool = False) -> dict[str, Any]:
    """The JSON body of SGLang's `POST /update_weights_from_tensor` for one ckptd update
    (`UpdateWeightsFromTensorReqInput`, python/sglang/srt/managers/io_struct.py).

    tp_size: the server's --tp: each rank unpickles the entry at its TP rank (with
    --enable-dp-attention that is the global TP rank, still tp_size entries). weight_version:
    set as the server's weight version on success (sent only when given). flush_cache: SGLang
    asserts the flush succeeded, so send False after `pause_generation` in mode "in_place" with
    requests running (a failed flush kills the scheduler). disable_draft_model: the update goes
    to the target model only, not to an EAGLE/MTP draft. abort_all_requests: abort running
    requests first."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be the server's tensor-parallel size, an integer >= 1, "
                         f"not {tp_size!r}")
    if not isinstance(load_format, str) or "." not in load_format:
        raise ValueError(f"load_format must be the loader's dotted path, as listed in "
                         f"--custom-weight-loader, not {load_format!r}")
    body: dict[str, Any] = {
        "serialized_named_tensors": [EMPTY_PAYLOAD] * tp_size,
        "load_format": load_format,
        "flush_cache": flush_cache,
        "abort_all_requests": abort_all_requests,
        "disable_draft_model": disable_draft_model,
    }
    if weight_version is not None:
        body["weight_version"] = weight_version
    return body
