"""Where a long ``visor reproduce --train`` stands, read from its work directory without loading a model.

For every stage folder (``visor.reproduce.pipeline``) it reads ``stage.json`` (status, seconds, commit)
and, for a training stage, ``run/metrics.jsonl``: the last logged step out of the recipe's ``max_steps``,
the last training loss, the throughput over the last logged windows, the latest validation summary
(easy/hard means, or the vision stage's accuracies) and an estimate of the time left at that throughput.
A stage folder that does not exist yet is listed as ``pending``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from visor.reproduce.stages import RECORD

STAGE_FOLDERS = ("1-vision", "2-base", "2b-focus", "2c-focus2", "2d-focus3", "2e-focus4", "3-stage1", "4-configs", "5-stage2", "5b-stage2b",
                 "6-labels", "7-router", "8-budget", "9-tr")
#: optional stages (the baseline's and stage 2's continuations, the budget choice): listed once their folder exists (a preset may
#: have none of them)
OPTIONAL_FOLDERS = ("2b-focus", "2c-focus2", "2d-focus3", "2e-focus4", "5b-stage2b", "8-budget", "9-tr")
THROUGHPUT_WINDOWS = 5  # logged windows averaged for the estimate


@dataclass
class StageStatus:
    """One stage's state (module docstring)."""

    name: str
    status: str  # pending | running | complete
    seconds: float | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    validation: dict = field(default_factory=dict)  # step + the scalar means of the latest evaluation
    commit: str | None = None

    def progress(self) -> str:
        if self.step is None or not self.max_steps:
            return "-"
        return f"{self.step}/{self.max_steps} ({100 * self.step / self.max_steps:.0f}%)"


def _metrics(path: Path) -> tuple[list[dict], list[dict]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]


def stage_status(folder: Path) -> StageStatus:
    """The state of one stage folder (``pending`` if it has no record yet)."""
    name = folder.name.split("-", 1)[-1]
    record_path = folder / RECORD
    if not record_path.exists():
        return StageStatus(name, "pending")
    record = json.loads(record_path.read_text())
    status = StageStatus(name, record.get("status", "?"), seconds=record.get("seconds"), commit=record.get("commit"))
    spec = record.get("spec") or {}
    train, evals = _metrics(folder / "run" / "metrics.jsonl")
    if train:
        last = train[-1]
        status.step, status.loss = int(last["step"]), float(last["loss"])
        status.max_steps = spec.get("max_steps")
        recent = [r["samples_per_s"] for r in train[-THROUGHPUT_WINDOWS:] if r.get("samples_per_s")]
        if recent:
            status.samples_per_s = sum(recent) / len(recent)
            if status.max_steps and status.status != "complete":
                left = max(status.max_steps - status.step, 0) * int(spec.get("global_batch") or 0)
                status.eta_s = left / status.samples_per_s
    if evals:
        latest = evals[-1]
        status.validation = {"step": latest["step"], **{k: v for k, v in latest["eval"].items()
                                                        if isinstance(v, (int, float)) and k.endswith(("_mean", "_acc"))}}
    return status


def work_dir_status(work_dir: Path) -> list[StageStatus]:
    """Every pipeline stage of ``work_dir`` in order (an optional stage only once its folder exists)."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise FileNotFoundError(f"{work_dir} does not exist: no `visor reproduce --train` has run there")
    return [stage_status(work_dir / name) for name in STAGE_FOLDERS
            if name not in OPTIONAL_FOLDERS or (work_dir / name).exists()]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_status(stages: list[StageStatus]) -> str:
    """A table: stage, status, progress, loss, samples/s, time left, latest validation."""
    header = f"{'stage':<8} {'status':<9} {'progress':<17} {'loss':>7} {'samples/s':>9} {'left':>7}  latest validation"
    lines = [header, "-" * len(header)]
    for s in stages:
        loss = f"{s.loss:.3f}" if s.loss is not None else "-"
        speed = f"{s.samples_per_s:.2f}" if s.samples_per_s is not None else "-"
        val = ""
        if s.validation:
            parts = [f"{k.replace('_mean', '').replace('_acc', '')} {100 * v:.1f}%" for k, v in s.validation.items()
                     if k != "step"]
            val = f"step {s.validation['step']}: " + ", ".join(parts)
        lines.append(f"{s.name:<8} {s.status:<9} {s.progress():<17} {loss:>7} {speed:>9} {_duration(s.eta_s):>7}  {val}")
    return "\n".join(lines)
