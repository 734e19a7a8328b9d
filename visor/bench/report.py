"""Benchmark output: the human table, ``rows.csv`` and ``results.json`` (written as rows finish), the plot,
the targets of issue 3 checked against the measured rows, and the one-line JSON summary."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

CSV_COLUMNS = (
    "image", "visual_tokens", "visual_tokens_llm", "text_tokens", "crops", "config", "prefill_s", "speedup",
    "analytic_speedup", "prefill_cpu_s", "cpu_speedup", "flops", "flops_executed", "achieved_flops_per_s", "fraction_of_peak", "vision_s", "ttft_s",
    "decode_b1_s", "decode_b16_s", "decode_b1_speedup", "decode_b16_speedup", "kv_bytes", "kv_bytes_analytic",
    "kv_ratio", "peak_memory_bytes", "peak_memory_kind", "prefill_memory_rise_bytes", "memory_error",
    "reducer", "visual_tokens_entering_llm", "selection_s", "selection_flops", "analytic_speedup_with_selection",
)
TARGET_ROW = "1152x1152"  # 7,371 visual tokens: where issue 3's targets are set


class Writer:
    """Owns the results folder: appends CSV rows and rewrites the JSON as each image row finishes."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "rows.csv"
        self.json_path = self.folder / "results.json"
        self.rows: list[dict] = []
        self.meta: dict = {}

    def start(self, meta: dict) -> None:
        self.meta = meta
        with open(self.csv_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writeheader()
        self._write_json()

    def add_rows(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
        self._write_json()

    def finish(self, meta: dict) -> None:
        """Final files: %-of-peak against the best peak of the run (measured at its start and end)."""
        self.meta = meta
        peak = best_peak(meta)
        if peak:
            for row in self.rows:
                row["fraction_of_peak"] = row["achieved_flops_per_s"] / peak
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
        self._write_json()
        if self.rows:
            try:
                plot_speedups(self.rows, self.folder / "speedup.png", meta)
            except ImportError as err:  # matplotlib is a core dependency; stay useful without it anyway
                print(f"no plot: {err}")
        (self.folder / "table.txt").write_text(format_table(self.rows, meta) + "\n")

    def table_for(self, rows: list[dict]) -> str:
        return format_table(rows, self.meta, header=False)

    def _write_json(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.json_path)


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _ms(seconds) -> str:
    return "-" if seconds is None else (f"{seconds * 1e3:.0f}" if seconds >= 1 else f"{seconds * 1e3:.1f}")


def _times(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mib(n) -> str:
    return "-" if not n else f"{n / 2**20:.0f}"


def format_table(rows: list[dict], meta: dict, header: bool = True) -> str:
    """One line per (image, configuration): prefill, speedups, % of peak, TTFT, decode, KV cache, memory."""
    lines = []
    if header and meta:
        m = meta.get("machine", {})
        lines.append(f"visor bench: {meta.get('geometry')}, {meta.get('dtype')}, {m.get('device')}, {m.get('threads')} threads, "
                     f"{m.get('cpu')}; torch {m.get('torch')}, transformers {m.get('transformers')}, commit {m.get('git_commit')}")
        lines.append(f"prefill = LLM only (visual features given), batch {meta.get('prefill_batch', 1)}; TTFT = vision tower + prefill; decode = ms/token "
                     "from a synthetic cache; %peak = executed FLOPs/s vs the measured matmul peak of this dtype")
    width = max([12] + [len(r["config"]) + 1 for r in rows])
    cols = (f"{'image':<10}{'Nv':>6} {'config':<{width}}{'prefill ms':>11}{'speedup':>8}{'analytic':>9}{'ratio':>6}{'%peak':>6}"
            f"{'TTFT ms':>9}{'dec b1':>8}{'dec b16':>9}{'b16 x':>6}{'KV MiB':>8}{'KV %':>6}{'RSS MiB':>8}")
    lines.append(cols)
    for r in rows:
        lines.append(
            f"{r['image']:<10}{r['visual_tokens_llm']:>6} {r['config']:<{width}}{_ms(r['prefill_s']):>11}{r['speedup']:>7.2f}x"
            f"{r['analytic_speedup']:>8.2f}x{r['speedup'] / r['analytic_speedup']:>6.2f}{100 * r['fraction_of_peak']:>5.0f}%"
            f"{_ms(r['ttft_s']):>9}{_ms(r.get('decode_b1_s')):>8}{_ms(r.get('decode_b16_s')):>9}"
            f"{_times(r.get('decode_b16_speedup')):>6}{_mib(r['kv_bytes']):>8}{100 * r['kv_ratio']:>5.0f}%"
            f"{_mib(r.get('peak_memory_bytes')):>8}"
        )
    for r in rows:  # the reducers' own work, outside the prefill times above
        if r.get("reducer"):
            lines.append(f"selection overhead {r['image']} {r['config']} ({r['reducer']}): {_ms(r.get('selection_s'))} ms, "
                         f"{(r.get('selection_flops') or 0) / 1e9:.1f} GFLOPs (not in prefill; analytic with it "
                         f"{r.get('analytic_speedup_with_selection', r['analytic_speedup']):.2f}x)")
    return "\n".join(lines)


def plot_speedups(rows: list[dict], path: Path, meta: dict) -> None:
    """Speedup vs visual tokens: measured (solid) next to the analytic FLOPs ratio (dashed), per configuration."""
    from visor.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    configs = [c for c in dict.fromkeys(r["config"] for r in rows) if c != "baseline"]
    cmap = plt.get_cmap("tab10")
    for i, config in enumerate(configs):
        points = sorted((r["visual_tokens"], r["speedup"], r["analytic_speedup"]) for r in rows if r["config"] == config)
        if not points:
            continue
        x = [p[0] for p in points]
        ax.plot(x, [p[1] for p in points], "o-", color=cmap(i % 10), label=f"{config} measured")
        ax.plot(x, [p[2] for p in points], "--", color=cmap(i % 10), alpha=0.7, label=f"{config} analytic")
    ax.set_xlabel("visual tokens (before any reduction)")
    ax.set_ylabel("LLM prefill speedup vs baseline")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    m = meta.get("machine", {})
    threads = m.get("threads")
    where = m.get("gpu") or f"{m.get('device')} ({threads} thread{'' if threads == 1 else 's'})"
    ax.set_title(f"{meta.get('geometry')} {meta.get('dtype')}, {where}, prefill batch {meta.get('prefill_batch', 1)}",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_targets(rows: list[dict], meta: dict) -> dict:
    """Issue 3's targets on the 1152x1152 row (7,371 visual tokens); absent rows give no verdict."""
    at = {r["config"]: r for r in rows if r["image"] == TARGET_ROW}
    if not at:
        return {"row": TARGET_ROW, "measured": False}
    out: dict = {"row": TARGET_ROW, "measured": True, "dtype": meta.get("dtype"), "prefill": {}}
    for name, r in at.items():
        if r.get("reducer"):  # issue 4: every reducer row, speedup >= 0.7 of its analytic ratio
            ratio = r["speedup"] / r["analytic_speedup"]
            out.setdefault("reducers", {})[name] = {
                "reducer": r["reducer"], "speedup": round(r["speedup"], 2), "analytic": round(r["analytic_speedup"], 2),
                "ratio": round(ratio, 3), "met": ratio >= 0.7, "selection_s": r.get("selection_s")}
            continue
        if name == "baseline" or not name.startswith("visor-") or name.startswith("visor-tr"):
            continue
        entry = {"speedup": round(r["speedup"], 2), "analytic": round(r["analytic_speedup"], 2),
                 "ratio": round(r["speedup"] / r["analytic_speedup"], 3)}
        entry["met"] = r["speedup"] >= 15 if name == "visor-ca" else entry["ratio"] >= 0.7
        out["prefill"][name] = entry
    if "visor-2sa" in at:
        two = at["visor-2sa"]
        out["kv_ratio_2sa"] = {"value": round(two["kv_ratio"], 3), "met": two["kv_ratio"] <= 0.45}
        if two.get("decode_b16_speedup") is not None:
            out["decode_b16_speedup_2sa"] = {"value": round(two["decode_b16_speedup"], 2), "met": two["decode_b16_speedup"] >= 1.3}
        if two.get("decode_b1_speedup") is not None:
            out["decode_b1_speedup_2sa"] = {"value": round(two["decode_b1_speedup"], 2)}
    if "baseline" in at:
        frac = at["baseline"]["fraction_of_peak"]
        out["baseline_fraction_of_peak"] = {"value": round(frac, 3), "met": frac >= 0.4 if meta.get("dtype") == "bf16" else None}
    return out


def best_peak(meta: dict) -> float | None:
    """The run's matmul peak in its own dtype: the best of the start and end measurements."""
    values = [meta.get(key, {}).get(meta.get("dtype"), {}).get("flops_per_s") for key in ("peak_start", "peak_end")]
    values = [v for v in values if v]
    return max(values) if values else None


def summarize(rows: list[dict], meta: dict, writer: Writer) -> dict:
    """Print the whole table; return the summary (the CLI prints it as the last line)."""
    print()
    print(format_table(rows, meta))
    targets = check_targets(rows, meta)
    (writer.folder / "targets.json").write_text(json.dumps(targets, indent=1))
    peak = meta.get("peak_start", {})
    peak_end = meta.get("peak_end", {})
    peaks = {k: max(v["flops_per_s"], peak_end.get(k, {}).get("flops_per_s", 0)) for k, v in peak.items()}
    return {
        "verb": "bench",
        "geometry": meta.get("geometry"),
        "dtype": meta.get("dtype"),
        "device": meta.get("machine", {}).get("device"),
        "threads": meta.get("machine", {}).get("threads"),
        "rows": len(rows),
        "interrupted": meta.get("interrupted", False),
        "seconds": meta.get("seconds"),
        "matmul_peak_flops_per_s": peaks,
        "targets": targets,
        "out": str(writer.folder),
        "csv": str(writer.csv_path),
        "json": str(writer.json_path),
        "plot": str(writer.folder / "speedup.png") if rows else None,
    }
