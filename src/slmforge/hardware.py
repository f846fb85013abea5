"""What this machine can do: bf16 support (the FLOP/s probe and the device peaks join it)."""

from __future__ import annotations


def use_bf16(precision: str) -> bool:
    """`precision` is auto | bf16 | fp32; auto means bf16 where the hardware runs it natively."""
    import torch

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # AVX512-BF16 / AMX: oneDNN runs bf16 matmuls natively (DESIGN: ~2x fp32 here)
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False
