"""The SGLang adapter's old home: the code is `ckptd.sglang` (installed) or
`integrations.ckptd.sglang`; these are the same objects. Servers launched with
`--custom-weight-loader integrations.sglang_adapter.custom_weight_loader` keep working."""
import os
import sys

if not __package__:  # loaded with integrations/ itself on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ckptd.sglang.adapter import (  # noqa: E402
    _receivers,
    ckptd_update,
    close,
    custom_weight_loader,
    custom_weight_loader_with_draft,
    is_draft_model,
    last_outcome,
    outcomes,
)

__all__ = ["_receivers", "ckptd_update", "close", "custom_weight_loader",
           "custom_weight_loader_with_draft", "is_draft_model", "last_outcome", "outcomes"]
