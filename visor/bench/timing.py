"""Timing helpers: a device-synchronised clock, medians, and this machine's matmul peak.

Prefill is compute-bound (large matmuls and attention), so its FLOP/s is compared with the best
sustained matmul rate measured here, in the same run and dtype. Decode is bound by reading the weights
and the KV cache, so it is reported as latency per token, not as a fraction of a FLOP peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (8192, 896, 4864))  # (m, k, n); the last is an MLP matmul


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds one call of ``fn`` takes (device work included) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 3, shapes=PEAK_SHAPES) -> dict:
    """Best FLOP/s of a plain ``a @ b`` over ``shapes`` and repeats (a ceiling, so the best, not the median)."""
    per_shape = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        timed(lambda: a @ b, device)  # warm-up
        seconds = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
        per_shape[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds
        del a, b
    return {"flops_per_s": max(per_shape.values()), "by_shape": per_shape}
