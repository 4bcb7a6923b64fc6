"""The engine side of ckptd: receive weight updates from the daemon of this host.

Needs only the standard library, and torch for real engines. One Receiver per GPU process:

    import os
    from integrations.ckptd import Receiver, apply_to_params
    # <stateDir>/sockets/gpu-<i>.sock: ~/.local/state/ckptd/... by hand, /var/lib/ckptd/... under systemd
    r = Receiver(os.path.expanduser("~/.local/state/ckptd/sockets/gpu-0.sock"), device="cuda:0", name="engine-0")
    params = dict(model.named_parameters())
    summary = r.receive(apply_to_params(params))   # one update; r.serve(...) loops

The protocol is integrations/PROTOCOL.md: JSON lines over a Unix socket, tensor bytes in the
daemon's bucket buffers ("slots"), which the receiver maps once and keeps mapped until the
daemon announces a new generation of buffers or the receiver is closed.

Buffer lifetime, the one rule that matters: a view handed to `apply` points into a slot the
daemon overwrites as soon as it sees the bucket's ack. So `apply` must copy what it needs and
must not keep the views; the receiver waits for the engine's device copies to complete
(current CUDA stream of the device) before it acks.

Modules: errors (the exceptions), dtypes, protocol (framing and tensor-entry checks), cuda
(the driver binding, finding the daemon's GPU), slots (mapping buffers, views), receiver
(the state machine), engine (apply_to_params, gpu_socket_path).
"""
from .dtypes import DTYPES, dtype_size, torch_dtype
from .engine import apply_to_params, gpu_socket_path, physical_gpu_index
from .errors import ProtocolError, ReceiveError, UpdateAborted
from .protocol import PROTOCOL
from .receiver import Delta, Receiver, Summary
from .slots import CudaSlot, HostSlot, Mapper

__all__ = [
    "DTYPES", "PROTOCOL", "CudaSlot", "Delta", "HostSlot", "Mapper", "ProtocolError", "ReceiveError",
    "Receiver", "Summary", "UpdateAborted", "apply_to_params", "dtype_size", "gpu_socket_path",
    "physical_gpu_index", "torch_dtype",
]
