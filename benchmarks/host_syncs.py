"""Operator and host-sync counts of one LLM prefill per configuration (CPU profiler, random weights).

On a GPU every ``aten::_local_scalar_dense`` (``.item()``, ``bool(tensor)``, ``.tolist()``) waits for the
launch queue to drain, and every top-level ``aten::`` op launches at least one kernel: at batch 1 these two
counts, not FLOPs, set a small model's prefill time. Counted on this CPU with the real geometry, so it needs
no GPU.

    python benchmarks/host_syncs.py [--geometry llava-ov-0.5b] [--visual-tokens 64] [--text-tokens 64]
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from visor.bench.models import build_models, llm_configs
from visor.bench.runner import prefill_call


def count(call) -> dict:
    call()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = list(prof.events())
    names = collections.Counter(e.name for e in events)
    top = sum(1 for e in events if e.name.startswith("aten::")
              and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return {"top_level_ops": top, "host_reads": names["aten::_local_scalar_dense"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", default="llava-ov-0.5b")
    parser.add_argument("--visual-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--configs", default="baseline,visor-ca,visor-2sa")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = build_models(args.geometry, torch.bfloat16, torch.device("cpu"))
    wanted = args.configs.split(",")
    rows = {}
    for config in llm_configs(models.visor.plan.num_slots, with_reducers=False):
        if config.name in wanted:
            rows[config.name] = count(prefill_call(models, config, args.visual_tokens, args.text_tokens))
            print(f"{config.name:<12} top-level aten ops {rows[config.name]['top_level_ops']:>6}   "
                  f"host reads {rows[config.name]['host_reads']:>4}", flush=True)
    print(json.dumps({"geometry": args.geometry, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
