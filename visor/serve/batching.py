"""Dynamic batching: one worker thread runs every generation.

Requests are queued (a bounded ``queue.Queue``: a full queue answers 503 at once, so memory stays
bounded by ``max_queue`` requests, each holding its decoded images). The worker takes the first waiting
request, keeps collecting for ``batch_wait_ms`` (or until ``max_batch * 4`` are waiting), groups them by
:meth:`GenSpec.key` (the active configuration or the router request, the reducer, and the sampling
options, stop strings and seed that must be shared by one ``generate`` call), and runs each group in
batches of at most ``max_batch`` with one ``model.generate`` each (``max_new_tokens`` = the largest
of the batch; every row is cut to its own limit). Results go back to each request's asyncio loop.

Streamed requests are generated one at a time: ``generate``'s streamer follows a single sample.
A request with a ``seed`` (and sampling) is also run alone, so its sample does not depend on others.

A batch whose ``generate`` fails is retried one request at a time, so a single bad request fails alone
(500) and the others are answered; the worker keeps running.

``stats``: ``requests`` (finished), ``batches`` (``generate`` calls), ``forward_passes`` (model forward
calls: one prefill plus one per decoded token, per group), ``max_batch_size``, ``batch_size_counts``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from visor.data.batch import Batcher, count_tokens
from visor.serve.inputs import Prepared
from visor.serve.schemas import ApiError


class _Cancelled(Exception):
    """Raised from a streamer to stop generating for a client that has gone."""


@dataclass
class Job:
    prepared: Prepared
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # non-streamed: set to the result dict or an ApiError
    events: asyncio.Queue | None = None  # streamed: ("delta", text) ..., then ("done", result) or ("error", ApiError)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.perf_counter)

    def deliver(self, kind: str, value: Any) -> None:
        def _set() -> None:
            if self.events is not None:
                self.events.put_nowait((kind, value))
            elif self.future is not None and not self.future.done():
                if kind == "error":
                    self.future.set_exception(value)
                else:
                    self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class _DeltaStreamer:
    """``generate(streamer=...)`` for one row: decodes incrementally and sends text deltas.

    The text sent is meant to be a prefix of the final text: a trailing incomplete character, trailing
    whitespace, or a tail that may be the start of a stop string, is held back until it is resolved.
    """

    def __init__(self, job: Job, engine: "BatchEngine") -> None:
        self.job = job
        self.engine = engine
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancelled:
            raise _Cancelled()
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        tokens, _finish = self.engine._cut(self.tokens, self.job.prepared.max_new_tokens)
        text = self.engine.decode(tokens)
        text, hit = _cut_stop(text, self.job.prepared.spec.stop)
        if hit:
            self.stopped = True
            safe = len(text)
        else:
            safe = len(text) - _held_back(text, self.job.prepared.spec.stop)
            if text.endswith("\ufffd"):  # an incomplete character
                safe = min(safe, len(text) - 1)
            # trailing spaces too: decoding more tokens may fold them (" ." -> "." in tokenisation clean-up)
            safe = min(safe, len(text.rstrip()))
        if safe > self.sent:
            self.job.deliver("delta", text[self.sent:safe])
            self.sent = safe

    def end(self) -> None:
        pass


def _cut_stop(text: str, stops) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class BatchEngine:
    """Owns the model; ``submit`` queues a :class:`Job`, the worker thread answers it."""

    def __init__(self, model, tokenizer, image_processor, *, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 max_queue: int = 256) -> None:
        from visor.cost import Geometry
        from visor.eval.harness import end_token

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batcher = Batcher.for_model(model, tokenizer, image_processor)
        self.geometry = Geometry.from_config(model.config)
        self.eos_token_id = end_token(tokenizer)
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {"requests": 0, "batches": 0, "forward_passes": 0, "max_batch_size": 0,
                                      "failed_requests": 0, "cancelled_requests": 0}
        self.batch_sizes: Counter = Counter()
        self._hook = model.register_forward_pre_hook(self._count_forward)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reducers: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="visor-serve-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:  # whatever is still queued is answered, not left hanging
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            job.deliver("error", ApiError(503, "the server is shutting down", code="shutting_down"))

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.queue.maxsize} requests waiting); retry later",
                           code="server_overloaded", type="server_error") from None

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.stats)
            out["batch_size_counts"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        out["queue_depth"] = self.queue.qsize()
        out["max_batch"] = self.max_batch
        out["batch_wait_ms"] = self.batch_wait * 1000
        return out

    def _count_forward(self, module, args) -> None:
        with self._lock:
            self.stats["forward_passes"] += 1

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            deadline = time.perf_counter() + self.batch_wait
            cap = self.max_batch * 4
            while len(jobs) < cap:
                remaining = deadline - time.perf_counter()
                try:
                    jobs.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
                except queue.Empty:
                    break
            for batch in self._group(jobs):
                self._run_batch(batch)

    def _group(self, jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        batches: list[list[Job]] = []
        for job in jobs:
            if job.cancelled:
                with self._lock:
                    self.stats["cancelled_requests"] += 1
                continue
            spec = job.prepared.spec
            if job.prepared.stream or spec.seed is not None:
                batches.append([job])  # alone (module docstring)
                continue
            groups.setdefault(spec.key(), []).append(job)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                batches.append(members[start:start + self.max_batch])
        return batches

    def _run_batch(self, jobs: list[Job]) -> None:
        try:
            results = self._generate(jobs)
        except _Cancelled:
            with self._lock:
                self.stats["cancelled_requests"] += len(jobs)
            return
        except Exception as err:  # noqa: BLE001 (answered, and the worker keeps serving)
            if len(jobs) > 1:
                for job in jobs:  # isolate the request that fails
                    self._run_batch([job])
                return
            with self._lock:
                self.stats["failed_requests"] += 1
            jobs[0].deliver("error", ApiError(500, f"generation failed: {type(err).__name__}: {err}",
                                              code="generation_failed"))
            return
        with self._lock:
            self.stats["requests"] += len(jobs)
        for job, result in zip(jobs, results):
            job.deliver("done", result)

    # ------------------------------------------------------------------ generation
    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _cut(self, tokens: list[int], limit: int) -> tuple[list[int], str | None]:
        """Tokens of the answer (up to the row's own limit, through the end token) and why it ended."""
        tokens = tokens[:limit]
        if self.eos_token_id is not None and self.eos_token_id in tokens:
            return tokens[: tokens.index(self.eos_token_id) + 1], "stop"
        return tokens, ("length" if len(tokens) >= limit else None)

    def _routes_resolution(self) -> bool:
        try:
            from visor.routing.router import routes_resolution
        except ImportError:
            return False
        return routes_resolution(self.model)

    def _reducer(self, spec: str | None):
        if spec is None:
            return None
        if spec not in self._reducers:
            from visor.compression import build_reducer

            self._reducers[spec] = build_reducer(spec)
        return self._reducers[spec]

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> list[dict]:
        from visor.eval.harness import item_cost, on_request_cost
        from visor.model.plan import format_slots

        spec = jobs[0].prepared.spec
        samples = [j.prepared.sample for j in jobs]
        on_request = spec.route and self._routes_resolution()
        batch = {} if on_request else self.batcher.prompt_batch(samples)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        max_new = max(j.prepared.max_new_tokens for j in jobs)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, do_sample=spec.do_sample, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k, repetition_penalty=spec.repetition_penalty, eos_token_id=self.eos_token_id,
            pad_token_id=self.batcher.pad_token_id,
        )
        if spec.stop:
            kwargs.update(stop_strings=list(spec.stop), tokenizer=self.tokenizer)
        if spec.seed is not None:
            kwargs["generator"] = torch.Generator(device=self.device).manual_seed(spec.seed)
        reducer = self._reducer(spec.reduce)
        if reducer is not None:
            kwargs["reducer"] = reducer
        routed = None
        # a router that picks the resolution too runs below (generate_on_request): tiles only where needed
        if spec.route and not on_request and callable(getattr(self.model, "route", None)):
            # ask the router first (its choices are needed for the FLOPs), then generate with them; the
            # images are encoded once for both
            features = self.model.encode_images(inputs["pixel_values"], inputs["image_sizes"],
                                                inputs["batch_num_images"]) if "pixel_values" in inputs else []
            routed = [tuple(c) for c in self.model.route(
                inputs["input_ids"], inputs["attention_mask"], image_features=features,
                batch_num_images=inputs.get("batch_num_images"), budget=spec.budget or 0.0)]
            kwargs["active_sa"] = routed
            kwargs["image_features"] = features
        elif spec.route and not on_request:  # generation routes internally: the choices (and FLOPs) stay unknown
            kwargs["route"] = True
            if spec.budget is not None:
                kwargs["budget"] = spec.budget
        elif not spec.route:
            kwargs["active_sa"] = [spec.config] * len(jobs)
        streamer = _DeltaStreamer(jobs[0], self) if jobs[0].prepared.stream else None
        if streamer is not None:
            kwargs["streamer"] = streamer
        started = time.perf_counter()
        if on_request:
            from visor.routing.resolution import generate_on_request

            result = generate_on_request(self.model, self.batcher, samples, budget=spec.budget or 0.0, **kwargs)
            sequences, batch, chosen = result.sequences, result.batch, result.configurations
            routed = [c.active_sa for c in chosen]
        else:
            sequences = self.model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - started
        with self._lock:
            self.stats["batches"] += 1
            self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(jobs))
            self.batch_sizes[len(jobs)] += 1
        new = sequences[:, batch["input_ids"].shape[1]:].cpu()
        visual, text = count_tokens(batch, self.model.config.image_token_id)
        results = []
        for row, job in enumerate(jobs):
            tokens, finish = self._cut(new[row].tolist(), job.prepared.max_new_tokens)
            answer = self.decode(tokens)
            answer, hit = _cut_stop(answer, spec.stop)
            if hit:
                finish = "stop"
                while tokens and tokens[-1] == self.batcher.pad_token_id:  # a row stopped by a stop string
                    tokens.pop()
            config = routed[row] if routed is not None else spec.config
            llm_flops = vision_flops = None
            n_visual = int(visual[row])
            if on_request:  # routing pass on the base layout, vision on the crops really encoded
                llm_flops, vision_flops, n_visual = on_request_cost(
                    self.model, self.geometry, chosen[row], reducer, job.prepared.image_sizes, int(visual[row]),
                    int(text[row]), result.crops[row])
            elif config is not None:
                llm_flops, vision_flops, n_visual = item_cost(
                    self.model, self.geometry, self.model.plan, config, reducer, job.prepared.image_sizes,
                    int(visual[row]), int(text[row]))
                if routed is not None:  # the routing pass is part of the request's cost
                    llm_flops += _router_flops(self.model, int(visual[row]), int(text[row]))
            results.append({
                "text": answer,
                "finish_reason": finish or "stop",
                "prompt_tokens": job.prepared.prompt_tokens,
                "completion_tokens": len(tokens),
                "visual_tokens": n_visual,
                "llm_flops": llm_flops,
                "vision_flops": vision_flops,
                "active_sa": format_slots(config) if config is not None else None,
                "resolution": chosen[row].resolution if on_request else "full",
                "route": spec.route,
                "budget": spec.budget,
                "reduce": spec.reduce,
                "batch_size": len(jobs),
                "queue_seconds": round(started - job.enqueued, 6),
                "generate_seconds": round(seconds, 6),
            })
        return results


def _router_flops(model, n_visual: int, n_text: int) -> float:
    """The routing pass's own LLM FLOPs (``visor.routing.router``), as ``visor eval`` adds them."""
    try:
        from visor.routing.router import router_overhead_flops
    except ImportError:
        return 0.0
    return float(router_overhead_flops(model, n_visual, n_text))
