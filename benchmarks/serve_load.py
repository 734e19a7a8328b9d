"""Load benchmark for ``visor serve`` on loopback (not a timed test).

    .venv/bin/python benchmarks/serve_load.py [--model DIR] [--clients 32] [--requests 4] [--max-tokens 8]

Starts ``visor serve`` as a subprocess on a free port of 127.0.0.1 (by default over a tiny random VISOR
checkpoint built in a temporary folder, the tests' geometry), asks every distinct prompt once alone to
get its reference answer, then runs ``--clients`` concurrent ``openai`` clients, each sending
``--requests`` requests in a row (a mix of three images, data URLs and local paths, and three SA
configurations). Checks: every answer equals its reference, none is dropped (every request answered
200), the server's RSS stays bounded (before / peak / after the load), and batching is visible
(``generate`` calls and forward passes, read from ``/health``, fewer than requests). Prints
requests/s and p50/p95 latency, then one JSON line. Exits 1 when a check fails. Traffic goes to
127.0.0.1 only; the run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_tiny_checkpoint(folder: Path) -> Path:
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from tests.tiny import tiny_image_processor, tiny_llava_config
    from visor.cli.main import main
    from visor.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = tiny_llava_config(num_layers=6, hidden=32, image_size=32)
    config.text_config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    llava = folder / "llava"
    model.save_pretrained(str(llava))
    tok.save_pretrained(str(llava))
    tiny_image_processor(config).save_pretrained(str(llava))
    main(["convert", str(llava), str(folder / "visor")])
    return folder / "visor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random VISOR checkpoint)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args()

    import httpx
    import numpy as np
    import openai
    import psutil
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="visor-serve-load-"))
    model_dir = Path(args.model) if args.model else build_tiny_checkpoint(work)
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    urls = []
    for k, (h, w) in enumerate([(40, 56), (64, 48), (32, 32)]):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        image.save(images / f"{k}.png")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        urls.append(("data", "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()))
        urls.append(("path", str(images / f"{k}.png")))
    configs = ["0", "1", "0+1"]

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    server = subprocess.Popen(
        [sys.executable, "-m", "visor", "serve", "--model", str(model_dir), "--model-name", "bench", "--port", str(port),
         "--allowed-image-dir", str(images), "--max-batch", str(args.max_batch), "--batch-wait-ms",
         str(args.batch_wait_ms), "--max-queue", str(max(256, args.clients * 2)), "--log-level", "warning"],
        cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.timeout
    try:
        while True:
            if server.poll() is not None:
                print(server.stdout.read(), file=sys.stderr)
                raise SystemExit("serve_load: the server exited during start-up")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("serve_load: the server did not start in time")
            time.sleep(0.2)
        proc = psutil.Process(server.pid)

        def ask(client, url: str, config: str) -> tuple[str, float, dict]:
            start = time.perf_counter()
            r = client.chat.completions.create(
                model="bench", max_tokens=args.max_tokens, extra_body={"visor": {"active_sa": config}},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "What colour is the largest shape?"}]}])
            return r.choices[0].message.content, time.perf_counter() - start, r.model_extra["visor"]

        # reference answers: each distinct prompt alone (batch of 1)
        solo = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        reference = {}
        for kind, url in urls:
            for config in configs:
                reference[(url, config)] = ask(solo, url, config)[0]
        rss_before = proc.memory_info().rss
        stats_before = httpx.get(base + "/health", timeout=10).json()["stats"]

        peak = [rss_before]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        plan = [[(urls[(c + r) % len(urls)][1], configs[(c * 7 + r) % len(configs)]) for r in range(args.requests)]
                for c in range(args.clients)]
        errors: list[str] = []
        latencies: list[float] = []
        wrong = 0
        batch_sizes: list[int] = []
        lock = threading.Lock()

        def client_run(jobs) -> None:
            nonlocal wrong
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=args.timeout)
            for url, config in jobs:
                try:
                    text, seconds, info = ask(client, url, config)
                except Exception as err:  # noqa: BLE001 (counted as dropped)
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    latencies.append(seconds)
                    batch_sizes.append(info["batch_size"])
                    if text != reference[(url, config)] or info["active_sa"] != config:
                        wrong += 1

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_run, plan))
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        rss_after = proc.memory_info().rss
        stats_after = httpx.get(base + "/health", timeout=10).json()["stats"]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    n_requests = args.clients * args.requests
    served = stats_after["requests"] - stats_before["requests"]
    batches = stats_after["batches"] - stats_before["batches"]
    forwards = stats_after["forward_passes"] - stats_before["forward_passes"]
    result = {
        "clients": args.clients, "requests_per_client": args.requests, "requests": n_requests,
        "answered": len(latencies), "dropped": len(errors), "wrong": wrong,
        "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 4) if latencies else None,
        "p95_latency_s": round(percentile(latencies, 0.95), 4) if latencies else None,
        "server_requests": served, "generate_calls": batches, "forward_passes": forwards,
        "mean_batch_size": round(served / batches, 2) if batches else None,
        "max_batch_size": max(batch_sizes) if batch_sizes else None,
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_peak_mb": round(peak[0] / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms, "model": str(args.model or "tiny random VISOR (6 layers, hidden 32)"),
    }
    checks = {
        "all_correct": wrong == 0 and not errors,
        "none_dropped": not errors and served == n_requests,
        "batching_visible": batches < n_requests and forwards < n_requests * (args.max_tokens + 1),
        "memory_bounded": rss_after - rss_before < 256 * 2**20,
    }
    result["checks"] = checks
    for err in errors[:5]:
        print(f"dropped: {err}", file=sys.stderr)
    print(f"{len(latencies)}/{n_requests} requests answered in {wall:.2f}s: {result['requests_per_s']} req/s, "
          f"p50 {result['p50_latency_s']}s, p95 {result['p95_latency_s']}s; {batches} generate calls "
          f"(mean batch {result['mean_batch_size']}), {forwards} forward passes; RSS {result['rss_before_mb']} -> "
          f"peak {result['rss_peak_mb']} -> {result['rss_after_mb']} MiB; checks: "
          f"{', '.join(f'{k}={v}' for k, v in checks.items())}")
    print(json.dumps(result, sort_keys=True))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
