"""``visor bench``: measured LLM prefill, time to first token, decode latency, memory and KV cache of VISOR
next to the baseline, at real LLaVA-OV geometry with random weights. See ``visor.bench.runner``.

Prints a table per image row as it finishes, the whole table, and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from visor.bench.models import GEOMETRIES, IMAGE_ROWS

    p = subparsers.add_parser(
        "bench",
        help="measure prefill/decode latency, memory and KV cache of VISOR vs the baseline",
        description=(
            "Benchmark VISOR configurations against the baseline (every layer self-attention) at real "
            "LLaVA-OneVision geometry with random weights: LLM prefill latency, time to first token (vision "
            "tower included), per-token decode latency at batch 1 and 16, peak memory and KV-cache bytes, "
            "next to the analytic FLOPs (visor cost) and this machine's measured matmul peak. Rows are "
            "written to OUT as they finish (Ctrl-C keeps them). The last line printed is one JSON object."
        ),
    )
    p.add_argument("--geometry", default="llava-ov-0.5b", help=f"model geometry: {', '.join(GEOMETRIES)} (default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights and compute dtype (default: auto, bf16 on a GPU or a CPU with AMX, fp32 elsewhere, "
                        "where bf16 matmuls are emulated and several times slower; the results record which ran)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: %(default)s)")
    p.add_argument("--out", default="runs/bench", help="results folder: rows.csv, results.json, speedup.png (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: two small image rows, four configurations, 2 repeats, no memory measurement")
    p.add_argument("--rows", metavar="NAMES",
                   help=f"comma-separated image rows to run, from: {', '.join(IMAGE_ROWS)} (default: all; --quick: base,384x384)")
    p.add_argument("--configs", metavar="NAMES",
                   help="comma-separated configurations (baseline, visor-ca, visor-1sa, visor-2sa, visor-4sa, visor-8sa, "
                        "visor-tr2x, visor-tr4x, pooling-matched, visionzip-matched, vispruner-matched, hired-matched "
                        "(baseline at the kept fraction matching VISOR 2 SA's FLOPs), fastv, pdrop (published defaults), "
                        "visor-2sa+visionzip, visor-2sa+vispruner; default: all; --quick: baseline, visor-ca, visor-2sa, visor-tr2x)")
    p.add_argument("--repeats", type=int, help="timed prefill repeats per configuration, median reported (default: 3; --quick: 2)")
    p.add_argument("--decode-tokens", type=int, help="timed decode steps per configuration and batch (default: 8; --quick: 3)")
    p.add_argument("--decode-batches", default="1,16", help="decode batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="prompts per timed prefill and images per vision-tower call (default: %(default)s); above 1 "
                        "shows a GPU's compute-bound regime; token-reduction rows need 1 and are left out")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core torch sees, or 1 when the load average says other processes are using them)")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--memory", dest="memory", action="store_true", default=None,
                        help="measure peak memory (a fresh forked process per row on CPU); default on, off with --quick")
    memory.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--reduce", action="append", default=[], metavar="NAME[:AMOUNT]",
                   help="add a baseline + token-compression row (any visor.compression reducer spec; selection timed on its own); repeatable")
    p.add_argument("--profile", action="store_true",
                   help="after the rows, profile one prefill per configuration on the last image row (OUT/profile_CONFIG.txt)")
    p.set_defaults(func=run)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from visor.bench.runner import dump_json, run_bench
    from visor.precision import resolve_precision

    try:
        batches = tuple(int(b) for b in args.decode_batches.split(",") if b.strip())
    except ValueError:
        print(f"visor bench: error: --decode-batches must be integers joined by ',', got {args.decode_batches!r}", file=sys.stderr)
        return 2
    try:
        summary = run_bench(
            geometry=args.geometry, dtype=resolve_precision(args.dtype, args.device), device=args.device, out=args.out, quick=args.quick,
            rows=_names(args.rows), configs=_names(args.configs), repeats=args.repeats, decode_tokens=args.decode_tokens,
            decode_batches=batches, text_tokens=args.text_tokens, threads=args.threads, memory=args.memory,
            extra_reducers=tuple(args.reduce), profile=args.profile, prefill_batch=args.prefill_batch,
        )
    except ValueError as err:
        print(f"visor bench: error: {err}", file=sys.stderr)
        return 2
    print(dump_json(summary))
    return 0
