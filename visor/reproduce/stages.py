"""Per-stage caching and resume for ``visor reproduce``.

Every stage of the pipeline (training runs, the viable-configuration search, labels, the router, each
method's evaluation, the timing) owns one folder under the work directory holding a ``stage.json``:

    {"stage": "base", "key": "<sha256>", "status": "running" | "complete", "spec": {...},
     "inputs": {"vision": "<output id>"}, "outputs": {"final": "run/final"}, "output_id": "<sha256>",
     "commit": "<git sha>", "started": ..., "finished": ..., "seconds": ...}

* ``key`` hashes the stage's own settings (``spec``: the recipe minus paths and logging knobs, or the
  search/label/router/eval settings) together with the ``output_id`` of every stage it reads.
* A stage whose record is ``complete``, whose key matches and whose outputs exist is **skipped**.
* A record with the same key that is still ``running`` was interrupted: a training stage **resumes** from
  its newest complete checkpoint (``Trainer(recipe, resume=True)``, atomic checkpoints); the other stages
  are short and simply run again.
* A record with a different key (a recipe changed, or an upstream stage was redone) is stale: its folder
  is moved aside to ``<folder>.stale`` (the previous stale copy is dropped) and the stage runs afresh.
* With ``reuse_from`` (another work directory), a stage that would run is instead hard-linked from there when
  that directory holds it complete under the same key (a stale copy here is moved aside first).
* ``output_id`` is new every time a stage completes, and downstream keys include it, so redoing a stage
  (``--force NAME``) invalidates everything after it, while a skipped stage keeps its descendants valid.

The code version (git commit) is recorded, not hashed: editing the code does not throw away hours of
training; ``--force`` redoes a stage on purpose.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RECORD = "stage.json"


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def git_commit(root: Path | None = None) -> str:
    """``HEAD`` of the repository holding this package (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "visor", "recipes"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class StageInterrupted(RuntimeError):
    """A stage stopped before finishing (Ctrl-C, SIGTERM, time limit); rerunning resumes it."""


@dataclass
class StageResult:
    name: str
    folder: Path
    key: str
    output_id: str
    outputs: dict = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    def path(self, name: str) -> Path:
        return self.folder / self.outputs[name]


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(folder / RECORD)


class StageCache:
    """Runs stages under ``work_dir`` with the rules of the module docstring."""

    def __init__(self, work_dir: str | Path, force: set[str] | None = None, log: Callable[[str], None] = print,
                 reuse_from: str | Path | None = None) -> None:
        """``reuse_from``: another work directory; a stage that would run here is hard-linked from there instead
        when that directory holds it complete under the same key (``visor reproduce --reuse-from``)."""
        self.work_dir = Path(work_dir)
        self.force = set(force or ())
        self.log = log
        self.commit = git_commit()
        self.reuse_from = Path(reuse_from) if reuse_from is not None else None
        if self.reuse_from is not None:
            if not self.reuse_from.is_dir():
                raise FileNotFoundError(f"--reuse-from: {self.reuse_from} is not a work directory")
            if self.work_dir.exists() and self.reuse_from.resolve() == self.work_dir.resolve():
                raise ValueError("--reuse-from names the work directory itself")

    def run(self, name: str, folder: str, spec: dict, inputs: dict[str, str],
            body: Callable[[Path], dict], resumable: bool = False) -> StageResult:
        """Run (or skip) one stage. ``body(folder) -> outputs`` (paths relative to ``folder``)."""
        path = self.work_dir / folder
        key = digest({"stage": name, "spec": spec, "inputs": inputs})
        record = read_record(path)
        forced = any(name == f or name.startswith(f + " ") for f in self.force)
        if record and record.get("key") == key and record.get("status") == "complete" and not forced:
            if _outputs_exist(path, record):
                return StageResult(name, path, key, record["output_id"], record.get("outputs", {}), cached=True,
                                   seconds=float(record.get("seconds") or 0.0))
            self.log(f"[{name}] outputs missing from {path}: running it again")
        same = record is not None and record.get("key") == key
        reusable = None if forced else self._reusable(folder, key)  # a finished copy beats resuming one here
        resume = same and record.get("status") == "running" and resumable and not forced and reusable is None
        if resume:
            self.log(f"[{name}] resuming the interrupted run in {path}")
        elif path.exists() and any(path.iterdir()):
            reason = "forced" if forced else ("settings or inputs changed" if record and not same else "incomplete")
            stale = path.with_name(path.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            path.rename(stale)
            self.log(f"[{name}] {reason}: previous folder moved to {stale}")
        if reusable is not None:
            shutil.rmtree(path, ignore_errors=True)  # an empty folder left by an earlier attempt
            _link_folder(reusable[0], path)
            source_record = reusable[1]
            self.log(f"[{name}] reused (hard-linked) from {reusable[0]}")
            return StageResult(name, path, key, source_record["output_id"], source_record.get("outputs", {}),
                               cached=True, seconds=float(source_record.get("seconds") or 0.0))
        started = time.time()
        previous = float(record.get("seconds") or 0.0) if resume else 0.0
        base = {"stage": name, "key": key, "spec": spec, "inputs": inputs, "commit": self.commit,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_record(path, {**base, "status": "running", "seconds": previous})
        try:
            outputs = body(path)
        except (KeyboardInterrupt, StageInterrupted):
            _write_record(path, {**base, "status": "running", "seconds": previous + time.time() - started})
            raise
        seconds = previous + time.time() - started
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        output_id = digest({"key": key, "finished": finished, "t": time.time()})
        _write_record(path, {**base, "status": "complete", "outputs": outputs, "output_id": output_id,
                             "finished": finished, "seconds": seconds})
        return StageResult(name, path, key, output_id, outputs, cached=False, seconds=seconds)

    def _reusable(self, folder: str, key: str) -> tuple[Path, dict] | None:
        """The ``reuse_from`` copy of ``folder`` and its record, if it is complete under ``key`` with its outputs."""
        if self.reuse_from is None:
            return None
        source = self.reuse_from / folder
        record = read_record(source)
        if not record or record.get("key") != key or record.get("status") != "complete":
            return None
        return (source, record) if _outputs_exist(source, record) else None


def _outputs_exist(folder: Path, record: dict) -> bool:
    return all((folder / rel).exists() for rel in record.get("outputs", {}).values())


def _link_folder(source: Path, target: Path) -> None:
    """Copy a complete stage folder as hard links (no data copied; nothing writes into a complete stage)."""
    import os

    shutil.copytree(source, target, copy_function=os.link)


def link_completed_stages(source: str | Path, target: str | Path, log: Callable[[str], None] = print) -> list[str]:
    """Hard-link every *complete* stage folder of work directory ``source`` that ``target`` lacks.

    A variant of a run (e.g. ``--resolutions full,base``, which changes the stages from the configuration
    search on) then starts from the same trained models without copying or retraining them: a linked stage
    whose key still matches is skipped, one whose key differs is moved aside and redone, as always. Only
    complete stages are linked, because nothing writes into a complete stage's files (records are replaced
    by rename), while a running stage appends to its metrics. Returns the linked folder names.
    (``StageCache(reuse_from=...)`` does the same per stage as the pipeline reaches it, also where ``target``
    holds a stale copy.)"""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise FileNotFoundError(f"--reuse-from: {source} is not a work directory")
    if source.resolve() == target.resolve():
        raise ValueError("--reuse-from names the work directory itself")
    target.mkdir(parents=True, exist_ok=True)
    linked = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.endswith(".stale")):
        record = read_record(folder)
        if not record or record.get("status") != "complete" or (target / folder.name).exists():
            continue
        _link_folder(folder, target / folder.name)
        linked.append(folder.name)
    log(f"linked {len(linked)} complete stage(s) from {source}: {', '.join(linked) or 'none'}")
    return linked
