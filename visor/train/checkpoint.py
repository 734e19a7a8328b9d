"""Checkpoints that survive faults.

Layout of a run folder::

    RUN/checkpoints/step_00000100/   model weights (safetensors, HF folder), training_state.pt, COMPLETE
    RUN/metrics.jsonl                one JSON line per logged step / evaluation

A checkpoint is written into ``.tmp-step_...`` and renamed into place only when everything (weights,
optimiser, scheduler, step, RNG, data position) is on disk and a ``COMPLETE`` marker with the files'
sizes is written; a run killed at any moment leaves either the previous checkpoints or a temp folder
that is ignored. On resume, candidates are checked newest first (marker present, sizes match, tensors
readable) and a corrupt one is skipped with a message in favour of the previous complete one.

Only one process may train into a run folder: :class:`RunLock` holds an OS lock on ``RUN/train.lock``
(released by the kernel when the process dies, even on SIGKILL), so a second ``visor train --resume`` or
``visor reproduce --train`` on the same folder stops with a message instead of interleaving checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"


LOCK_FILE = "train.lock"


class RunLock:
    """Exclusive lock on a run folder for the lifetime of a training process (module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RuntimeError(
                f"another training process (pid {holder}) is writing to {self.path.parent}; "
                "wait for it to finish or stop it (it saves a checkpoint on SIGTERM) before resuming"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint(run_dir: Path, step: int, save_weights: Callable[[Path], None], state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write checkpoint ``step``: ``save_weights(folder)`` writes the model, ``state`` the rest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp)
    torch.save(state, tmp / STATE_FILE)
    sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({"step": step, "sizes": sizes}))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / MARKER).exists())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        if not str(tmp).endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` if ``folder`` is a complete, readable checkpoint; otherwise why not."""
    marker = folder / MARKER
    if not marker.exists():
        return "no COMPLETE marker (the write was interrupted)"
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "unreadable COMPLETE marker"
    for name, size in info.get("sizes", {}).items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    try:
        from safetensors import safe_open

        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable"
        return f"cannot read it back ({type(err).__name__}: {err})"
    return None


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest usable checkpoint of a run; corrupt ones are reported and skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return None
    for folder in sorted(root.glob("step_*"), reverse=True):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        log(f"skipping checkpoint {folder.name}: {problem}")
    return None
