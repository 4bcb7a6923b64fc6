"""Safetensors dtype names: their element sizes, and the torch dtypes they stand for."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors name -> (torch attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4),
    "F64": ("float64", 8), "I8": ("int8", 1), "I16": ("int16", 2), "I32": ("int32", 4),
    "I64": ("int64", 8), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def _entry(name: object) -> tuple[str, int]:
    entry = DTYPES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"dtype {name!r} is not supported by the ckptd receiver "
                         f"(supported: {', '.join(DTYPES)})")
    return entry


def dtype_size(name: object) -> int:
    """Bytes per element of a safetensors dtype name."""
    return _entry(name)[1]


def torch_dtype(name: object) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16" -> torch.bfloat16)."""
    import torch
    attr = _entry(name)[0]
    dtype = getattr(torch, attr, None)
    if dtype is None:
        raise ValueError(f"dtype {name!r} needs torch.{attr}, which this torch lacks")
    return dtype
