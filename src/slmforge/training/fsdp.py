"""FSDP2 for the training loop (slmforge.training.loop's `parallel: fsdp`, with several processes): the
model sharded over all processes (`fully_shard`, one unit per decoder layer), checkpoints written sharded
with torch.distributed.checkpoint (one folder beside the loop's checkpoint file, a shard file per process),
and the trained model gathered whole for saving. The loop holds what the checkpoint resumes; this module
only moves weights and optimizer state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slmforge import dist


def wanted(parallel: str) -> bool:
    """Whether the loop shards: several processes, and `parallel: fsdp` or a launch config of type FSDP
    (accelerate sets ACCELERATE_USE_FSDP)."""
    return dist.world_size() > 1 and (parallel == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")


def shard(model, device) -> None:
    """Shard `model` in place over all processes with FSDP2: each decoder layer (the classes transformers
    names in `_no_split_modules`) is one unit, gathered for its forward and backward only, and the root
    holds the embeddings, final norm and head. Parameters stay float32 and bf16 autocast does the casting,
    as in DDP and one process, so the three follow one loss curve (a MixedPrecisionPolicy with bf16
    parameters would halve the all-gather bytes, and put the norms' weights in bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init()
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    model.to(device)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def checkpoint_dir(ckpt: Path) -> Path:
    """Where a sharded run's checkpoint lives: a torch.distributed.checkpoint folder beside `ckpt`."""
    return ckpt.with_suffix(".dcp")


def remove(ckpt: Path) -> None:
    shutil.rmtree(checkpoint_dir(ckpt), ignore_errors=True)


def _state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def save(model, opt, extra: dict, ckpt: Path, weights: bool) -> None:
    """Every process writes its shards of the weights and optimizer state into a temp folder, the main
    process adds `extra` (the loop's sampler cursors and state, loop.pt), then swaps the folder in (the
    previous one is kept as .old until the new one is in place). Called on every process. Without
    `weights` (the checkpoint before the first step, that pins a minutes budget's step count) only `extra`
    is saved: asking for the optimizer's state dict would initialise it with a zero-gradient step, and
    AdamW's step count would then be one ahead of a run that never checkpointed at step 0."""
    import torch
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(ckpt)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if weights:
        dcp.save(_state(model, opt), checkpoint_id=str(tmp))
    if dist.is_main():
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(extra, tmp / "loop.pt")
        if final.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(model, opt, ckpt: Path) -> dict | None:
    """The `extra` of the sharded checkpoint beside `ckpt` (None when there is none), with its weights and
    optimizer state loaded into `model` and `opt` where it holds them. Called on every process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    final = checkpoint_dir(ckpt)
    old = final.with_name(final.name + ".old")  # a run killed between the two renames
    src = final if (final / "loop.pt").is_file() else old if (old / "loop.pt").is_file() else None
    if src is None:
        return None
    if (src / ".metadata").is_file():  # weights and optimizer were saved (any checkpoint after step 0)
        saved = _state(model, opt)  # the shapes and placements to load into
        dcp.load(saved, checkpoint_id=str(src))
        set_model_state_dict(model, saved["model"])
        set_optimizer_state_dict(model, opt, saved["optimizer"])
    return torch.load(src / "loop.pt", map_location="cpu", weights_only=False)


def gather(model, model_cls):
    """The sharded `model`, whole, in a fresh `model_cls` on the main process (None on the others): its
    shards are gathered to the CPU (a collective: every process calls this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    whole = model_cls(model.config)
    whole.load_state_dict(full)
    whole.generation_config = model.generation_config
    return whole
