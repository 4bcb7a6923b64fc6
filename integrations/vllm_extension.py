"""The worker extension's old import path, kept for servers started with
`--worker-extension-cls integrations.vllm_extension.CkptdWorkerExtension`: the code is
`ckptd.vllm.extension` (integrations/ckptd/vllm/extension.py)."""
from .ckptd import Receiver
from .ckptd.vllm.extension import CkptdWorkerExtension

__all__ = ["CkptdWorkerExtension", "Receiver"]
