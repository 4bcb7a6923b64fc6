"""The receiver's public names, where engines have imported them from since the start:

    from integrations.ckptd_receiver import Receiver, apply_to_params

The code is in the package integrations/ckptd/ (`from integrations.ckptd import ...` is the
same objects)."""
import os
import sys

if not __package__:  # loaded with integrations/ itself on sys.path (bench/tiny_update.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ckptd import (  # noqa: E402
    DTYPES,
    PROTOCOL,
    CudaSlot,
    Delta,
    HostSlot,
    Mapper,
    ProtocolError,
    ReceiveError,
    Receiver,
    Summary,
    UpdateAborted,
    apply_to_params,
    dtype_size,
    gpu_socket_path,
    physical_gpu_index,
    torch_dtype,
)

__all__ = [
    "DTYPES", "PROTOCOL", "CudaSlot", "Delta", "HostSlot", "Mapper", "ProtocolError", "ReceiveError",
    "Receiver", "Summary", "UpdateAborted", "apply_to_params", "dtype_size", "gpu_socket_path",
    "physical_gpu_index", "torch_dtype",
]
