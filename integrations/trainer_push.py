"""The trainer helpers' old home: `ckptd.trainer` (installed) or `integrations.ckptd.trainer`.

    python3 integrations/trainer_push.py http://127.0.0.1:8470 demo [http|shm|staged] [TOKENS_FILE]
"""
import os
import sys

if not __package__:  # run as a script, or imported with integrations/ on sys.path (bench/)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from integrations.ckptd.trainer import (  # noqa: E402
    DTYPES,
    HostDeviceMemory,
    StagingArea,
    main,
    push_cuda,
    push_http,
    push_shm,
    push_staged,
    token_from,
    write_safetensors,
)

__all__ = ["DTYPES", "HostDeviceMemory", "StagingArea", "main", "push_cuda", "push_http", "push_shm", "push_staged", "token_from", "write_safetensors"]

if __name__ == "__main__":
    main()
