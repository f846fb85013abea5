"""rank / world size / barrier, on_main (main process does it, the others wait), mean and
broadcast_int, all no-ops in one process. Set up only when torchrun or `accelerate launch` put
WORLD_SIZE > 1 in the environment (nanochat's rule: distributed is a layer)."""

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


_WAIT: dict = {}


def barrier() -> None:
    """Every process waits until all get here. It runs on a gloo group of its own with a week's timeout,
    because here the other ranks wait while the main process works alone (a whole stage such as curate,
    tokenizing a corpus, saving a model), and the default group's timeout (NCCL: 10 minutes) is meant
    for collectives that take seconds."""
    if world_size() == 1:
        return
    from datetime import timedelta

    import torch.distributed as td

    init()
    if "group" not in _WAIT:  # created by every rank at its first barrier, so in the same order everywhere
        _WAIT["group"] = td.new_group(backend="gloo", timeout=timedelta(days=7))
    td.barrier(group=_WAIT["group"])


def on_main(fn, *args, **kwargs):
    """Call `fn(*args, **kwargs)` on the main process only, then wait until every process gets here
    (so all of them can read what it wrote); returns its result on the main process, None elsewhere."""
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return result


def _device():
    """Where a collective's tensor must live: the current GPU under nccl, else the CPU (gloo)."""
    import torch
    import torch.distributed as td

    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def mean(x: float) -> float:
    """The mean of `x` over all processes (a float32 all-reduce); `x` itself, untouched, in one process."""
    if world_size() == 1:
        return x
    import torch
    import torch.distributed as td

    init()
    t = torch.tensor([x], device=_device())
    td.all_reduce(t)
    return t.item() / world_size()


def broadcast_int(x: int) -> int:
    """The main process's `x` on every process; `x` itself in one process."""
    if world_size() == 1:
        return x
    import torch
    import torch.distributed as td

    init()
    t = torch.tensor([x], device=_device())
    td.broadcast(t, 0)
    return int(t.item())
