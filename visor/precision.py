"""Compute precision for evaluation: bf16 autocast where the hardware runs it fast, else fp32.

bf16 autocast is several times faster than fp32 on a CPU with AMX tiles (Intel Sapphire Rapids and later)
and on recent GPUs, but several times *slower* on a CPU without them (AVX2/AVX-512 without AMX emulate the
bf16 matmuls: an AMD EPYC without AMX evaluated the shipped VISOR model at 3.0 items/s in bf16 against 13.5 in
fp32, `visor eval --split test --n 64 --batch-size 16`). ``auto`` picks by the machine. The two differ by rounding:
on the reproduction's 500 test items the baseline's and VISOR's means moved by at most 2 of 250 items, the
token-selecting compressors by up to 8 (a rounding change flips which tokens they keep). Reports record which ran.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run natively on ``device``: CUDA with bf16 support, or a CPU with AMX tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent -> assume no AMX
    return bool(probe()) if probe is not None else False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``: ``auto`` becomes bf16 where :func:`fast_bf16` holds, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device_type: str = "cpu"):
    """bf16 autocast for ``"bf16"`` (``"auto"`` resolved first), a no-op context for fp32."""
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()
