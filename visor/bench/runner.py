"""``visor bench``: measured prefill / decode latency and memory of VISOR next to the baseline.

What is measured, per input-image row and LLM configuration (``visor.bench.models``):

* **LLM prefill** (batch 1, or ``prefill_batch`` identical prompts):
  ``forward(image_features=..., logits_to_keep=1, use_cache=True)``, i.e. what generation runs before the
  first token, with the visual features passed in (the vision tower is timed on its own, since VISOR does
  not change it). A batch above 1 shows the compute-bound regime of a GPU, where batch 1 of a small model
  is bound by kernel launches; token-reduction rows need batch 1 and are left out then. Configurations
  are *interleaved*: every repeat runs each of them once, in a rotated order, so load drift on a shared
  machine hits all alike. Median over repeats, after warm-up.
* **Vision tower**: SigLIP + projector + anyres packing for the row's crops (median over repeats, run
  in the same interleaved loop). **Time to first token** = vision tower + LLM prefill (the two run one
  after the other; composed from the two medians).
* **Decode**: per-token latency over N greedy steps (median), batch 1 and batch 16, from a *synthetic*
  cache filled with noise at the row's prompt length (``synthetic_cache``: the same tensors per layer
  kind as a real prefill leaves), so batch 16 needs no 16 long prefills.
* **Memory**: peak RSS of a fresh subprocess per row on CPU (``visor.bench.memory``), the allocator's peak
  on CUDA; **KV-cache bytes** of the real batch-1 prefill cache, next to the analytic count.
* **Analytic**: ``visor.cost`` FLOPs for the same row (LLM only, LM head on the last position), the FLOPs
  ratio vs the baseline beside the measured speedup, and the achieved FLOP/s as a fraction of this
  machine's matmul peak, measured in the same run (``matmul_peak``). Achieved FLOP/s uses the FLOPs a
  causal kernel executes (``causal_halving=True``: SDPA skips the masked half of the score matrix).

Rows are written to ``rows.csv`` / ``results.json`` as each image row finishes, so Ctrl-C keeps them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from visor.bench import models as bench_models
from visor.bench.models import (
    IMAGE_ROWS,
    BenchConfig,
    BenchModels,
    build_models,
    image_tokens_and_crops,
    llm_configs,
    prompt_ids,
    reducers_available,
    synthetic_cache,
    visual_features,
)
from visor.bench.timing import matmul_peak, median, synchronize, timed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK_ROWS = ("base", "384x384")
QUICK_SHAPES = ((2048, 2048, 2048), (4096, 896, 4864))


# ------------------------------------------------------------------------------------------ calls
def prefill_call(models: BenchModels, config: BenchConfig, n_visual: int, n_text: int, image_size=None,
                 use_cache: bool = True, batch: int = 1):
    """A closure running the LLM prefill of ``config`` on a ``n_visual`` + ``n_text`` prompt (features given)."""
    model = models.for_config(config)
    ids = prompt_ids(model, n_visual, n_text, batch).to(models.device)
    feats = visual_features(model, n_visual, batch)
    feats = [f.to(models.device) for f in feats]
    active = config.active(models.visor.plan)
    if config.reducer is None:
        kwargs, selection_s, per_layer = {"input_ids": ids, "image_features": feats}, None, None
    else:  # pre-LLM: selection done here, once, so the timed call is the LLM on the kept tokens; in-LLM: inside
        from visor.compression.timing import bench_prefill_inputs

        if batch != 1 or image_size is None:
            raise ValueError(f"{config.name}: reducer rows need batch 1 and an anyres image size")
        prepared = bench_prefill_inputs(model, config.reducer, ids, image_size, image_features=feats)
        kwargs, selection_s, per_layer = prepared["forward"], prepared["selection_s"], prepared["visual_tokens_per_layer"]

    @torch.no_grad()
    def call():
        return model(**kwargs, active_sa=active, use_cache=use_cache, logits_to_keep=1)

    call.selection_s = selection_s  # the reducer's scoring/merging, timed once (not part of call's time)
    call.visual_tokens_per_layer = per_layer
    return call


def vision_call(models: BenchModels, row, crops: int, batch: int = 1):
    """A closure encoding ``batch`` images of ``row``: SigLIP + projector (+ anyres packing for a sized image)."""
    model = models.visor
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, crops, 3, size, size, generator=torch.Generator().manual_seed(2)).to(models.device, models.dtype)

    @torch.no_grad()
    def call():
        if row.size is None:
            return model.multi_modal_projector(model.vision_features(pixels.flatten(0, 1)))
        return model.encode_images(pixels, torch.tensor([list(row.size)] * batch, device=models.device))

    return call


def decode_latency(models: BenchModels, config: BenchConfig, n_visual: int, n_text: int, batch: int,
                   steps: int, warmup: int = 1) -> dict:
    """Median seconds per greedy decode step from a synthetic cache; the cache's bytes per sample."""
    model = models.for_config(config)
    kinds = model.plan.layer_kinds(config.active(models.visor.plan))
    cache = synthetic_cache(model, kinds, batch, n_visual, n_text)
    kv_bytes = cache.num_bytes // batch
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=models.device)
    mask = torch.ones(batch, 1, dtype=torch.long, device=models.device)
    times = []
    with torch.no_grad():
        for step in range(warmup + steps):
            seconds, out = timed(lambda: model(tokens, attention_mask=mask, past_key_values=cache, logits_to_keep=1),
                                 models.device)
            logits = out.logits[:, -1]
            logits[:, model.config.image_token_id] = float("-inf")  # as generation does: never an image slot
            tokens = logits.argmax(-1, keepdim=True)
            if step >= warmup:
                times.append(seconds)
    del cache
    return {"seconds": median(times), "kv_bytes_per_sample": kv_bytes}


# --------------------------------------------------------------------------------------- analytic
def analytic_row(models: BenchModels, config: BenchConfig, n_visual: int, n_text: int, n_crops: int, image_size) -> dict:
    """``visor.cost`` numbers for one row: LLM prefill FLOPs (full and causal-halved), decode step, KV bytes."""
    from visor.cost import Geometry, count_decode_step, count_prefill, kv_cache_bytes
    from visor.cost.flops import reducer_schedule

    model = models.for_config(config)
    geometry = Geometry.from_config(model.config)
    plan = model.plan
    active = config.active(models.visor.plan)
    schedule, overhead = None, 0
    if config.reducer is not None:  # as `visor cost --reduce`: kept tokens per layer, selection FLOPs apart
        schedule, overhead = reducer_schedule(geometry, config.reducer, n_visual, n_text, n_crops)
    common = dict(visual_tokens_per_layer=schedule)
    prefill = count_prefill(geometry, plan, active, n_visual, n_text, n_crops=n_crops, **common)
    executed = count_prefill(geometry, plan, active, n_visual, n_text, causal_halving=True, **common)
    with_selection = count_prefill(geometry, plan, active, n_visual, n_text, compression_overhead_flops=overhead, **common)
    decode = count_decode_step(geometry, plan, active, n_visual, n_text, **common)
    kv = kv_cache_bytes(geometry, plan, active, n_visual, n_text, dtype_bytes=torch.empty((), dtype=models.dtype).element_size(),
                        **common)
    # the synthetic decode cache has one visual length for every layer: the mean of an in-LLM schedule
    n_llm = n_visual if schedule is None else round(sum(schedule) / len(schedule))
    return {
        "visual_tokens_llm": n_llm,
        "visual_tokens_entering_llm": n_visual if schedule is None else schedule[0],
        "selection_flops": overhead,
        "flops_with_selection": with_selection.llm_total,  # what `visor cost --reduce` reports
        "flops": prefill.llm_total,
        "flops_executed": executed.llm_total,
        "vision_flops": (prefill.vision_encoder or 0) + (prefill.projector or 0),
        "decode_flops": decode.llm_total,
        "kv_bytes_analytic": kv.total,
    }


# ------------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device, threads: int) -> dict:
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
        "load_average_start": list(os.getloadavg()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


# ------------------------------------------------------------------------------------------- the run
def run_bench(*args, **kwargs) -> dict:
    """Run the benchmark (arguments: ``_run_bench``); torch's thread count is restored afterwards."""
    previous = torch.get_num_threads()
    try:
        return _run_bench(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def _run_bench(
    geometry: str = "llava-ov-0.5b",
    dtype: str = "bf16",
    device: str = "cpu",
    out: str | os.PathLike = "runs/bench",
    quick: bool = False,
    rows: list[str] | None = None,
    configs: list[str] | None = None,
    repeats: int | None = None,
    decode_tokens: int | None = None,
    decode_batches: tuple[int, ...] = (1, 16),
    text_tokens: int = 64,
    threads: int | None = None,
    memory: bool | None = None,
    extra_reducers: tuple[str, ...] = (),
    peak_shapes=None,
    profile: bool = False,
    prefill_batch: int = 1,
    log=print,
) -> dict:
    """Run the benchmark; returns the summary printed as the last JSON line. See the module docstring.

    ``prefill_batch``: prompts per timed prefill (and images per vision-tower call); token-reduction rows
    need batch 1 and are dropped above it. ``profile``: after the rows, one ``torch.profiler`` pass of every
    configuration's prefill on the last image row, written to ``OUT/profile_CONFIG.txt`` (ops by self CPU
    time) with a summary in results.json.
    """
    from visor.bench.report import Writer, summarize

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if text_tokens <= 14:
        raise ValueError(f"--text-tokens must be more than 14 (the prompt before the image), got {text_tokens}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    thread_note = "as given"
    if threads is None:
        threads, thread_note = default_threads()
    if threads <= 0:
        raise ValueError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)
    row_names = list(rows or (QUICK_ROWS if quick else IMAGE_ROWS))
    unknown = [r for r in row_names if r not in IMAGE_ROWS]
    if unknown:
        raise ValueError(f"unknown image row(s) {unknown}; known: {', '.join(IMAGE_ROWS)}")
    repeats = repeats or (2 if quick else 3)
    decode_tokens = decode_tokens or (3 if quick else 8)
    if repeats <= 0 or decode_tokens <= 0 or any(b <= 0 for b in decode_batches):
        raise ValueError("repeats, decode tokens and decode batch sizes must be positive")
    if prefill_batch <= 0:
        raise ValueError(f"--prefill-batch must be positive, got {prefill_batch}")
    memory = (dev.type == "cuda" or not quick) if memory is None else memory
    torch_dtype = DTYPES[dtype]
    all_configs, why_not = select_configs(geometry, quick, configs, extra_reducers)
    if prefill_batch > 1:
        if extra_reducers:
            raise ValueError("--reduce rows need batch 1; drop --prefill-batch or --reduce")
        dropped = [c.name for c in all_configs if c.reducer is not None]
        all_configs = [c for c in all_configs if c.reducer is None]
        if dropped:
            why_not = f"token-reduction rows need batch 1 (prefill batch {prefill_batch}): {', '.join(dropped)} left out"

    started = time.time()
    writer = Writer(Path(out))
    meta = {"geometry": geometry, "dtype": dtype, "repeats": repeats, "decode_tokens": decode_tokens,
            "decode_batches": list(decode_batches), "text_tokens": text_tokens, "quick": quick,
            "prefill_batch": prefill_batch,
            "machine": machine_info(dev, threads)}
    meta["machine"]["threads_choice"] = thread_note
    log(f"visor bench: {geometry}, {dtype}, {dev}, {threads} threads ({thread_note}), {meta['machine']['cpu']}, "
        f"prefill batch {prefill_batch}; out {writer.folder}")

    shapes = peak_shapes or (QUICK_SHAPES if quick else None)
    peaks = {name: matmul_peak(DTYPES[name], dev, **({"shapes": shapes} if shapes else {})) for name in ("bf16", "fp32")}
    log("matmul peak: " + ", ".join(f"{k} {v['flops_per_s'] / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    meta["peak_start"] = peaks

    models = build_models(geometry, torch_dtype, dev)
    meta["configs"] = [asdict(c) for c in all_configs]
    meta["reducer_rows"] = "included" if why_not is None else f"skipped: {why_not}"
    if why_not is not None:
        log(f"note: VISOR-TR / compression rows skipped ({why_not}); they join via visor.bench.models.REDUCER_ROWS")
    writer.start(meta)

    # warm-up: every configuration once on a short prompt, the vision tower on one crop
    for config in all_configs:
        if config.reducer is None:
            prefill_call(models, config, 64, text_tokens)()
    vision_call(models, IMAGE_ROWS["base"], 1)()

    server = None
    if memory and dev.type == "cpu":
        from visor.bench.memory import MemoryServer

        server = MemoryServer(geometry, str(torch_dtype).replace("torch.", ""))
    interrupted = False
    try:
        for row_name in row_names:
            row = IMAGE_ROWS[row_name]
            results = measure_row(models, row, all_configs, text_tokens, repeats, decode_tokens, decode_batches,
                                  peaks, dtype, memory, server, log, prefill_batch)
            writer.add_rows(results)
            log(writer.table_for(results))
        if profile:
            meta["profile"] = profile_prefills(models, IMAGE_ROWS[row_names[-1]], all_configs, text_tokens, writer.folder, log)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: the rows finished so far are on disk")
    finally:
        if server is not None:
            server.close()

    meta["load_average_end"] = list(os.getloadavg())
    if not interrupted:  # %-of-peak uses the better of the two peaks (rows.csv is rewritten with it)
        meta["peak_end"] = {name: matmul_peak(DTYPES[name], dev, **({"shapes": shapes} if shapes else {}))
                            for name in ("bf16", "fp32")}
    meta["seconds"] = round(time.time() - started, 1)
    meta["interrupted"] = interrupted
    writer.finish(meta)
    summary = summarize(writer.rows, meta, writer)
    return summary


def profile_prefills(models: BenchModels, row, configs: list[BenchConfig], text_tokens: int, folder: Path, log) -> dict:
    """One profiled prefill per configuration: where the time goes, by kernel class (see ``run_bench``)."""
    from torch.profiler import ProfilerActivity, profile

    n_visual, _ = image_tokens_and_crops(models.visor, row)
    summary = {}
    for config in configs:
        if config.reducer is not None and row.size is None:
            continue
        call = prefill_call(models, config, n_visual, text_tokens, row.size)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if models.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            call()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        by_class = {"attention (SDPA kernels)": 0, "matmul (mm/addmm/bmm)": 0, "conv": 0, "other (elementwise, copies, ...)": 0}
        for e in events:
            if "_scaled_dot_product_" in e.key and any(k in e.key for k in ("flash", "efficient", "cudnn")):
                key = "attention (SDPA kernels)"
            elif e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
                key = "matmul (mm/addmm/bmm)"
            elif "convolution" in e.key:
                key = "conv"
            else:
                key = "other (elementwise, copies, ...)"
            by_class[key] += e.self_cpu_time_total
        shares = {k: round(v / total, 4) for k, v in by_class.items()}
        table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48)
        (folder / f"profile_{config.name}.txt").write_text(
            f"{config.label}: prefill of {row.label}, {n_visual} visual + {text_tokens} text tokens\n"
            f"self CPU time by kernel class: {json.dumps(shares)}\n\n{table}\n")
        summary[config.name] = {"self_cpu_s": total / 1e6, "shares": shares}
        log(f"  profile {config.name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
    return summary


def default_threads() -> tuple[int, str]:
    """torch's default (every core), or 1 when other processes keep the cores busy.

    On a shared machine, OpenMP threads that wait for a core another process holds stall every parallel
    region; one thread then runs faster than two (measured on the 2-core VM of the README table: matmul
    peak 1.16 vs 0.49 TFLOP/s).
    """
    cores = torch.get_num_threads()
    load = os.getloadavg()[0]
    if cores > 1 and load >= cores - 0.5:
        return 1, f"1-minute load average {load:.1f} on {cores} cores: the cores are busy, so 1 thread; --threads overrides"
    return cores, "torch's default: every core"


def check_bench_reducer(spec: str) -> None:
    """A ``--reduce`` spec must name a reducer (checked before anything slow starts). Every reducer runs:
    pre-LLM ones select once before the timed prefill (vision-attention cues from random pixels with the
    row's crop count, ``visor.compression.timing.bench_prefill_inputs``), in-LLM ones prune inside it; the
    selection time is reported on its own (``selection_s``)."""
    from visor.compression.registry import build_reducer

    build_reducer(spec)


def select_configs(geometry: str, quick: bool, names: list[str] | None, extra_reducers) -> tuple[list[BenchConfig], str | None]:
    """The configurations to run (validated before anything slow starts) and why reducer rows are absent."""
    from transformers import LlavaOnevisionConfig

    from visor.model.plan import LayerPlan

    path = bench_models.config_path(geometry)
    num_slots = LayerPlan.default(LlavaOnevisionConfig.from_json_file(path).text_config.num_hidden_layers).num_slots
    why_not = reducers_available()
    if extra_reducers and why_not is not None:
        raise ValueError(f"--reduce needs visor.compression: {why_not}")
    for spec in extra_reducers:
        check_bench_reducer(spec)
    configs = llm_configs(num_slots, with_reducers=why_not is None, extra_reducers=tuple(extra_reducers))
    if quick and names is None:
        keep = {"baseline", "visor-ca", "visor-2sa", "visor-tr2x"}
        configs = [c for c in configs if c.name in keep]
    if names is not None:
        by_name = {c.name: c for c in configs}
        missing = [c for c in names if c not in by_name]
        if missing:
            raise ValueError(f"unknown configuration(s) {missing}; known: {', '.join(by_name)}")
        configs = [by_name[c] for c in names]
    if not any(c.baseline and c.reducer is None for c in configs):
        configs.insert(0, llm_configs(num_slots, with_reducers=False)[0])  # speedups need the baseline
    return configs, why_not


def measure_row(models: BenchModels, row, configs: list[BenchConfig], text_tokens: int, repeats: int, decode_tokens: int,
                decode_batches, peaks: dict, dtype: str, memory: bool, server, log, prefill_batch: int = 1) -> list[dict]:
    """Every configuration on one image row: analytic, interleaved prefill + vision timing, decode, memory.

    Prefill, vision and memory run ``prefill_batch`` prompts at once; FLOPs and achieved FLOP/s count the
    whole batch, KV-cache bytes are per sample.
    """
    dev = models.device
    n_visual, crops = image_tokens_and_crops(models.visor, row)
    usable = [c for c in configs if c.reducer is None or row.size is not None]  # reducers need an anyres layout
    log(f"\n== {row.name}: {row.label}; {n_visual} visual + {text_tokens} text tokens, {crops} crop(s)")
    calls = {c.name: prefill_call(models, c, n_visual, text_tokens, row.size, batch=prefill_batch) for c in usable}
    vision = vision_call(models, row, crops, prefill_batch)
    analytic = {c.name: analytic_row(models, c, n_visual, text_tokens, crops, row.size or (384, 384)) for c in usable}
    for config in usable:  # reducer rows: warm once on their own (shorter) prompts; log the selection overhead
        if config.reducer is not None:
            calls[config.name]()
            log(f"  selection overhead {config.name} ({config.reducer}): {calls[config.name].selection_s * 1e3:.1f}ms")

    # warm-up at this size: the cheapest configuration with an SA layer
    cheapest = min((c for c in usable if c.reducer is None and not c.baseline), key=lambda c: analytic[c.name]["flops"],
                   default=usable[0])
    calls[cheapest.name]()

    prefill_times: dict[str, list[float]] = {c.name: [] for c in usable}
    prefill_cpu: dict[str, list[float]] = {c.name: [] for c in usable}  # process CPU time: contention shows as wall > cpu
    vision_times, kv_measured = [], {}
    for r in range(repeats):
        order = usable[r % len(usable):] + usable[: r % len(usable)]
        vision_times.append(timed(vision, dev)[0])
        for config in order:
            cpu = time.process_time()
            seconds, out = timed(calls[config.name], dev)
            prefill_cpu[config.name].append(time.process_time() - cpu)
            prefill_times[config.name].append(seconds)
            kv_measured[config.name] = (out.past_key_values.num_bytes // prefill_batch
                                        if out.past_key_values is not None else None)
            del out
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{c.name} {prefill_times[c.name][-1]:.2f}s" for c in usable))
    vision_s = median(vision_times)

    decode = {c.name: {} for c in usable}
    for batch in decode_batches:
        for config in usable:
            n_llm = analytic[config.name]["visual_tokens_llm"]
            decode[config.name][batch] = decode_latency(models, config, n_llm, text_tokens, batch, decode_tokens)
        log(f"  decode batch {batch}: " + ", ".join(f"{c.name} {decode[c.name][batch]['seconds'] * 1e3:.1f}ms" for c in usable))

    mem = {}
    if memory:
        for config in usable:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                out = calls[config.name]()
                synchronize(dev)
                mem[config.name] = {"peak_bytes": torch.cuda.max_memory_allocated(dev), "kind": "cuda allocator peak"}
                del out
            elif server is not None:
                result = server.measure({"config": asdict(config), "n_visual": n_visual, "n_text": text_tokens,
                                         "image_size": list(row.size) if row.size else None, "batch": prefill_batch})
                mem[config.name] = {"peak_bytes": result.get("peak_rss_bytes"), "kind": "fresh-process peak RSS",
                                    "prefill_rise_bytes": result.get("prefill_rise_bytes"), "error": result.get("error")}
        log("  peak memory: " + ", ".join(f"{k} {(v['peak_bytes'] or 0) / 2**20:.0f}MiB" for k, v in mem.items()))

    peak = max(peaks[dtype]["flops_per_s"], 1.0)
    base_name = next(c.name for c in usable if c.baseline and c.reducer is None)
    base_prefill = median(prefill_times[base_name])
    base_cpu = median(prefill_cpu[base_name])
    results = []
    for config in usable:
        a = analytic[config.name]
        prefill_s = median(prefill_times[config.name])
        dec = decode[config.name]
        results.append({
            "image": row.name,
            "image_label": row.label,
            "visual_tokens": n_visual,
            "visual_tokens_llm": a["visual_tokens_llm"],
            "visual_tokens_entering_llm": a["visual_tokens_entering_llm"],
            "reducer": config.reducer,
            "selection_s": calls[config.name].selection_s,
            "selection_flops": a["selection_flops"],
            "text_tokens": text_tokens,
            "crops": crops,
            "config": config.name,
            "config_label": config.label,
            "prefill_s": prefill_s,
            "prefill_all_s": prefill_times[config.name],
            "prefill_cpu_s": median(prefill_cpu[config.name]),
            "speedup": base_prefill / prefill_s,
            "cpu_speedup": base_cpu / max(median(prefill_cpu[config.name]), 1e-9),
            "analytic_speedup": analytic[base_name]["flops"] / a["flops"],  # the timed LLM work (selection apart)
            "analytic_speedup_with_selection": analytic[base_name]["flops"] / a["flops_with_selection"],
            "prefill_batch": prefill_batch,
            "flops": a["flops"],
            "flops_executed": a["flops_executed"],
            "achieved_flops_per_s": a["flops_executed"] * prefill_batch / prefill_s,
            "fraction_of_peak": a["flops_executed"] * prefill_batch / prefill_s / peak,
            "vision_s": vision_s,
            "vision_flops": a["vision_flops"],
            "ttft_s": vision_s + prefill_s,
            **{f"decode_b{b}_s": dec[b]["seconds"] for b in decode_batches},
            **{f"decode_b{b}_speedup": decode[base_name][b]["seconds"] / dec[b]["seconds"] for b in decode_batches},
            "decode_flops": a["decode_flops"],
            "kv_bytes": kv_measured.get(config.name),
            "kv_bytes_analytic": a["kv_bytes_analytic"],
            "kv_ratio": (kv_measured.get(config.name) or 0) / max(kv_measured.get(base_name) or 1, 1),
            "peak_memory_bytes": mem.get(config.name, {}).get("peak_bytes"),
            "peak_memory_kind": mem.get(config.name, {}).get("kind"),
            "prefill_memory_rise_bytes": mem.get(config.name, {}).get("prefill_rise_bytes"),
            "memory_error": mem.get(config.name, {}).get("error"),
        })
    return results


def dump_json(obj) -> str:
    return json.dumps(obj, default=str, sort_keys=True)
