"""Peak memory of one benchmark row.

CPU: every row runs in a *fresh process*, because a process's peak RSS only ever rises. To avoid paying
an interpreter start and a model build per row, one server subprocess (``python -m visor.bench.memory``)
imports torch, builds the model once (constant weights: values do not change memory) and then forks a
child per row: the child starts with exactly the model's pages and its own peak counter (Linux sets a new
process's ``VmHWM`` to its RSS at fork), runs the row's LLM prefill (the bench's prefill batch, KV cache
kept, as generation does) and reports ``VmHWM``. The server runs single-threaded so forking is safe; memory does not depend on
the thread count. ``prefill_rise_bytes`` is the peak over the model alone (activations + KV cache).

GPU: the caching allocator's peak, reset before the row, in the benchmark's own process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """The process's peak RSS (``VmHWM``: exact, where ``ru_maxrss`` can lag behind the current RSS)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kib * 1024


class MemoryServer:
    """The server subprocess, driven one JSON line per row (see module docstring)."""

    def __init__(self, geometry: str, dtype: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visor.bench.memory", json.dumps({"geometry": geometry, "dtype": dtype})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )

    def measure(self, row: dict) -> dict:
        if self.proc.poll() is not None:
            return {"error": f"memory server exited ({self.proc.returncode}): {self.proc.stderr.read()[-300:]}"}
        self.proc.stdin.write(json.dumps(row) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"memory server died: {self.proc.stderr.read()[-300:]}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_row_in_child(models, row: dict) -> dict:
    """Fork; the child runs the row's prefill and sends back its peak RSS."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        torch.set_num_threads(1)  # no OpenMP team after a fork
        try:
            result = run_row(models, row)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, never raised past the fork
            result = {"error": f"{type(err).__name__}: {err}"}
        os.write(write_fd, json.dumps(result).encode())
        os.close(write_fd)
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "no result from the child"}')


def run_row(models, row: dict) -> dict:
    """In this process: the row's prefill; peak RSS, the RSS before it, and the cache's bytes."""
    from visor.bench.models import BenchConfig
    from visor.bench.runner import prefill_call

    config = BenchConfig(**row["config"])
    call = prefill_call(models, config, row["n_visual"], row["n_text"], row.get("image_size"), use_cache=True,
                        batch=row.get("batch", 1))
    before = current_rss()
    with torch.no_grad():
        out = call()
    peak = peak_rss()
    kv = out.past_key_values.num_bytes if out.past_key_values is not None else None
    return {"peak_rss_bytes": peak, "model_rss_bytes": before, "prefill_rise_bytes": peak - before, "kv_bytes": kv}


def serve(spec: dict) -> None:
    from visor.bench.models import build_models

    torch.set_num_threads(1)
    models = build_models(spec["geometry"], getattr(torch, spec["dtype"]), "cpu", init="fill")
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_row_in_child(models, json.loads(line))), flush=True)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
