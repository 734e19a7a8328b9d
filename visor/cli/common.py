"""Argument helpers shared by CLI verbs."""

from __future__ import annotations

import argparse
import json

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_config_choice(parser: argparse.ArgumentParser) -> None:
    """``--active-sa SLOTS`` | ``--sa-count K``: which SA slots run."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--active-sa", metavar="SLOTS", default=None,
                       help="SA slot numbers joined by '+', e.g. '0+2'; 'none' = cross-attention only; 'all' = every slot (default: all)")
    group.add_argument("--sa-count", metavar="K", type=int, default=None,
                       help="switch on the first K SA slots in the plan's slot order")


def resolve_config_choice(args: argparse.Namespace, plan) -> tuple[int, ...]:
    if args.sa_count is not None:
        return plan.first_slots(args.sa_count)
    return plan.resolve_active(args.active_sa)


def add_dtype(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default, help=f"weights/compute dtype (default {default})")


def print_json_line(obj: dict) -> None:
    """The last line of a verb's output: one JSON object."""
    print(json.dumps(obj, sort_keys=True, default=str))
