"""Side-by-side validation table of training runs, from their ``metrics.jsonl`` files (Markdown on stdout).

    python benchmarks/tower_ab_table.py runs/tower-ab/a-metrics.jsonl runs/tower-ab/b-metrics.jsonl \
        --names "A: default tower" "B: shape tower"

One row per run and evaluation step: easy and hard means and every family's accuracy, then each run's median
training throughput. Written for ``benchmarks/tower_ab.sh``; works on any run folder's metrics.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[float]]:
    """The evaluation rows (step + summary) and the logged samples/s of one run."""
    evals, speeds = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row.get("eval"), dict) and "per_family" in row["eval"]:
            evals.append({"step": row["step"], **row["eval"]})
        elif "samples_per_s" in row:
            speeds.append(float(row["samples_per_s"]))
    return evals, speeds


def table(runs: dict[str, Path]) -> str:
    parsed = {name: read_metrics(path) for name, path in runs.items()}
    families = sorted({f for evals, _ in parsed.values() for e in evals for f in e["per_family"]})
    header = ["run", "step", "items", "easy", "hard", *families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, (evals, _) in parsed.items():
        for e in evals:
            cells = [name, str(e["step"]), str(e.get("n_items", "")), f"{100 * e['easy_mean']:.1f}",
                     f"{100 * e['hard_mean']:.1f}"]
            cells += [f"{100 * e['per_family'][f]:.0f}" if f in e["per_family"] else "" for f in families]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, (_, speeds) in parsed.items():
        median = f"{statistics.median(speeds):.1f}" if speeds else "n/a"
        lines.append(f"- {name}: median {median} samples/s over {len(speeds)} logged windows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    parser.add_argument("--names", nargs="+", help="a label per run (default: the file paths)")
    args = parser.parse_args(argv)
    names = args.names or [str(p) for p in args.metrics]
    if len(names) != len(args.metrics):
        parser.error(f"{len(args.metrics)} metrics files but {len(names)} names")
    missing = [str(p) for p in args.metrics if not p.is_file()]
    if missing:
        parser.error("no such metrics file: " + ", ".join(missing))
    print(table(dict(zip(names, args.metrics))))


if __name__ == "__main__":
    main()
