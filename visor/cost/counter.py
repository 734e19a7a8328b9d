"""Measured FLOPs of real forward passes, with ``torch.utils.flop_counter.FlopCounterMode``.

The analytic model (``visor.cost.flops``) is checked against these counts in
``tests/test_cost_crosscheck.py``. Two traps of torch 2.13, handled here:

* On CPU, ``scaled_dot_product_attention`` dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
  for which ``FlopCounterMode`` has no formula: attention counts as zero (PyTorch issue 195460).
  ``count_flops`` registers torch's own SDPA formula (``sdpa_flop_count``: ``QK^T`` plus ``AV`` over every
  query head, no causal halving) for that op, and reports attention on its own line.
* ``sdpa_backend="math"`` forces the eager (math) SDPA path instead: attention then decomposes into
  ordinary ``bmm``/``mm`` calls, so the *matmul* line alone includes attention, independently of any
  registered formula.

Only matmul-like ATen ops are summed into ``matmul`` (``mm``, ``addmm``, ``bmm``, ``baddbmm``); convolutions
go to ``conv``. Elementwise work is not counted, as in the analytic model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

MATMUL_OPS = (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
CONV_OPS = (aten.convolution, aten._convolution)
# SDPA kernels; the first has no formula in torch 2.13's FlopCounterMode (counted as 0 without ours)
SDPA_OPS = (
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's own SDPA formula (what it uses for the CUDA kernels), for the CPU flash kernel."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA_FORMULA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@dataclass
class FlopCount:
    """FLOPs of one call, by kind; ``by_module`` maps a module path to its FLOPs per ATen op."""

    matmul: int
    attention: int
    conv: int
    other: int
    by_module: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.conv + self.other

    def module(self, suffix: str, ops: tuple = MATMUL_OPS) -> int:
        """FLOPs of the module whose path ends with ``suffix`` (e.g. ``".lm_head"``), over ``ops``."""
        names = {str(op) for op in ops}
        hits = [counts for path, counts in self.by_module.items() if path.endswith(suffix)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} counted modules end with {suffix!r}")
        return sum(v for k, v in hits[0].items() if k in names)


def _sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[backend])


def count_flops(fn: Callable[..., Any], *args, sdpa_backend: str | None = None, register_cpu_sdpa: bool = True,
                **kwargs) -> tuple[Any, FlopCount]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode``; return its result and the counts.

    ``register_cpu_sdpa=False`` leaves torch's default mapping (CPU SDPA counted as zero), to show the trap.
    """
    mapping = CPU_SDPA_FORMULA if register_cpu_sdpa else None
    with _sdpa_context(sdpa_backend), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn(*args, **kwargs)
    counts = counter.get_flop_counts()
    totals = counts["Global"]
    matmul = sum(v for op, v in totals.items() if op in MATMUL_OPS)
    attention = sum(v for op, v in totals.items() if op in SDPA_OPS)
    conv = sum(v for op, v in totals.items() if op in CONV_OPS)
    other = sum(totals.values()) - matmul - attention - conv
    by_module = {
        path: {str(op): int(v) for op, v in ops.items()} for path, ops in counts.items() if path != "Global"
    }
    return result, FlopCount(int(matmul), int(attention), int(conv), int(other), by_module)
