"""rank / world size / barrier, as no-ops in one process. Set up only when torchrun or
`accelerate launch` put WORLD_SIZE > 1 in the environment (nanochat's rule: distributed is a layer)."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Start the process group once (gloo on CPU, nccl on GPUs); accelerate then reuses it."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as td

    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend=backend)


def barrier() -> None:
    if world_size() == 1:
        return
    import torch.distributed as td

    init()
    td.barrier()
