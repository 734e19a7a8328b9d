"""Resolution on request, measured end to end at LLaVA-OV geometry (random weights, this machine).

One process, one random-weight model at real geometry (the shipped LLaVA-OV ``config.json``: SigLIP-so400m,
projector, Qwen2 with VISOR's default plan), bf16 weights by default. Timed, per repeat, interleaved in a
rotated order after one warm-up pass (medians kept):

* ``full``: a ``--size`` image (default 1152x1152: base view + 9 tiles, 10 crops, 7,371 visual tokens) through
  the vision tower and projector, then VISOR's prefill with ``--sa`` SA slots on (``logits_to_keep=1``, cache
  built, as generation's first step);
* ``base``: the same image laid out base-only (``visor.model.resolution``: 1 crop, 730 visual tokens), same slots;
* ``baseline``: the original model (every layer SA) on the full layout (``--no-baseline`` skips it);
* ``routed->base`` / ``routed->full``: what a sample routed on request costs (``visor.routing.resolution``):
  the base view encoded, the routing pass on the base layout, then either the base prefill (features reused)
  or the tiles encoded (the base view reused: square image) and the full prefill;
* ``route@L``: the routing pass alone, reading after layer L (``--read-after``), on the base layout: what the
  router's placement costs.

Each row is split into vision (tower + projector) and LLM seconds; the analytic FLOPs (``visor.cost``) stand
beside them. Prints a table and, last, one JSON line.

    python benchmarks/resolution_e2e.py [--size 1152 1152] [--sa 2] [--repeats 3] [--threads 2] [--no-baseline]
        [--device cuda] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"llava-ov-0.5b": "llava-onevision-qwen2-0.5b-ov-hf", "llava-ov-1.5b": "llava-onevision-qwen2-1.5b-ov-hf"}
N_TEXT = 64  # prompt text tokens (14 before the image, the rest after it)
BEFORE = 14


def build(geometry: str, dtype: torch.dtype, device: str = "cpu"):
    """A random-weight VISOR model (default plan) at ``geometry`` on ``device``; N(0, 0.02) matrices, unit norms."""
    from visor.convert.llava_onevision import convert_llava_onevision

    model = convert_llava_onevision(str(ROOT / "visor" / "configs" / CONFIGS[geometry] / "config.json"), device="meta", dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)
    return model.eval()


def image_processor(model):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    size = model.config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                                           image_grid_pinpoints=[list(p) for p in model.config.image_grid_pinpoints])


def prompt(model, n_visual: int, device: str = "cpu", batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10_000, (1, N_TEXT + n_visual), generator=gen)
    ids[ids == model.config.image_token_id] = 0
    ids[:, BEFORE:BEFORE + n_visual] = model.config.image_token_id
    return ids.expand(batch, -1).contiguous().to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", default="llava-ov-0.5b", choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, nargs=2, default=[1152, 1152], metavar=("H", "W"), help="image height width")
    parser.add_argument("--sa", type=int, default=2, help="active SA slots of the VISOR rows (first K of the plan)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="samples per pass (copies of the image and prompt): "
                        "times are per batch, FLOPs per sample")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on a GPU every timed part ends with a synchronize")
    parser.add_argument("--no-baseline", action="store_true", help="skip the all-SA baseline row (its LLM prefill is slow)")
    parser.add_argument("--read-after", type=int, nargs="*", default=[1, 4, 7], metavar="L",
                        help="router placements timed (decoder layer the routing token is read after)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import numpy as np
    from PIL import Image

    from visor.cost import count_baseline_prefill, get_geometry
    from visor.model.plan import LayerPlan
    from visor.model.resolution import BASE, FULL, Configuration
    from visor.processing.processor import images_to_pixels
    from visor.routing.resolution import configuration_flops, encode_tiles, on_request_flops
    from visor.routing.router import attach_router, router_overhead_flops, routing_logits

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    started = time.perf_counter()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build(args.geometry, dtype, args.device)
    baseline = copy.copy(model)  # the same modules under the all-SA plan: the original LLaVA-OV computation
    baseline.config = copy.deepcopy(model.config)
    baseline.config.set_plan(LayerPlan.all_self_attention(model.config.text_config.num_hidden_layers))
    build_seconds = time.perf_counter() - started
    plan = model.plan
    active = plan.first_slots(args.sa)
    processor = image_processor(model)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (args.size[0], args.size[1], 3), dtype=np.uint8))
    def on_device(pixels: dict) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in pixels.items()}

    full_px = on_device(images_to_pixels(processor, [[image]] * args.batch))
    base_px = on_device(images_to_pixels(processor, [[image]] * args.batch, [False] * args.batch))
    sizes = full_px["image_sizes"]
    n_full, n_base = model.num_image_tokens(tuple(args.size)), model.num_image_tokens(tuple(args.size), tiled=False)
    ids_full, ids_base = prompt(model, n_full, args.device, args.batch), prompt(model, n_base, args.device, args.batch)
    configs = [Configuration((), BASE), Configuration(active, BASE), Configuration(active, FULL), Configuration(plan.all_slots, FULL)]
    routed = copy.copy(model)  # the same modules, plus a random router over both resolutions
    routed.config = copy.deepcopy(model.config)
    routed._modules = dict(model._modules)  # so that attaching the router leaves `model` as it is
    attach_router(routed, configs, read_after_layer=max(args.read_after))
    routed.router.to(device=device, dtype=dtype)
    reuse = torch.equal(full_px["pixel_values"][0, 0], base_px["pixel_values"][0, 0])

    ones = [1] * args.batch

    def encode(px, tiled):
        return model.encode_images(px["pixel_values"].to(dtype), sizes, ones, [tiled] * args.batch)

    def prefill(m, ids, feats, sa):
        m(ids, image_features=feats, batch_num_images=ones, active_sa=sa, logits_to_keep=1, use_cache=True)

    state = {}

    def vision_full():
        state["full"] = encode(full_px, True)

    def vision_base():
        state["base"] = encode(base_px, False)

    def vision_tiles():
        state["tiles"] = encode_tiles(model, full_px["pixel_values"].to(dtype), sizes, [f if reuse else None for f in state["base"]])

    def route(read):
        def run():
            routed.config.router["read_after_layer"] = read
            routing_logits(routed, ids_base, torch.ones_like(ids_base), [[f] for f in state["base"]])
        return run

    geometry = get_geometry(args.geometry)
    n_crops = configuration_flops(model, Configuration(active, FULL), [tuple(args.size)], N_TEXT, geometry).n_crops
    full_part = f"vision full ({n_crops} crops)"  # base view + tiles of a --size image (10 at the default 1152x1152)
    # (name, [(part, callable)]): every part timed on its own; rows compose them
    parts = {
        full_part: vision_full,
        "vision base (1 crop)": vision_base,
        "vision tiles (base reused)": vision_tiles,
        "LLM full": lambda: prefill(model, ids_full, state["full"], active),
        "LLM base": lambda: prefill(model, ids_base, state["base"], active),
    }
    if not args.no_baseline:
        parts["LLM baseline full"] = lambda: prefill(baseline, ids_full, state["full"], None)
    for read in args.read_after:
        parts[f"route@{read}"] = route(read)
    names = list(parts)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up, in dependency order
            parts[n]()
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[: rep % len(names)]
            order = sorted(order, key=lambda n: 0 if n.startswith("vision base") else 1)  # the base features first
            for n in order:
                sync()
                start = time.perf_counter()
                parts[n]()
                sync()
                times[n].append(time.perf_counter() - start)
    med = {n: statistics.median(v) for n, v in times.items()}
    read0 = args.read_after[0]
    rows = {
        f"full, {args.sa} SA": (med[full_part], med["LLM full"]),
        f"base only, {args.sa} SA": (med["vision base (1 crop)"], med["LLM base"]),
        f"routed->base (read@{read0})": (med["vision base (1 crop)"], med[f"route@{read0}"] + med["LLM base"]),
        f"routed->full (read@{read0})": (med["vision base (1 crop)"] + med["vision tiles (base reused)"],
                                          med[f"route@{read0}"] + med["LLM full"]),
    }
    if not args.no_baseline:
        rows["baseline (all SA), full"] = (med[full_part], med["LLM baseline full"])
    routed.config.router["read_after_layer"] = read0
    flops = {
        f"full, {args.sa} SA": configuration_flops(model, Configuration(active, FULL), [tuple(args.size)], N_TEXT, geometry).total,
        f"base only, {args.sa} SA": configuration_flops(model, Configuration(active, BASE), [tuple(args.size)], N_TEXT, geometry).total,
    }
    for key, res in ((f"routed->base (read@{read0})", BASE), (f"routed->full (read@{read0})", FULL)):
        cost = on_request_flops(routed, Configuration(active, res), [tuple(args.size)], N_TEXT, base_reused=reuse,
                                geometry=geometry)
        flops[key] = cost["llm"] + cost["vision"]
    if not args.no_baseline:
        flops["baseline (all SA), full"] = count_baseline_prefill(geometry, n_full, N_TEXT, n_crops=n_crops).total
    full_key = f"full, {args.sa} SA"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.geometry}, {args.dtype}, {where}, image {args.size[0]}x{args.size[1]} ({n_full} visual tokens full, {n_base} base only), "
          f"{N_TEXT} text tokens, batch {args.batch} (seconds per batch, FLOPs per sample), median of {args.repeats}")
    print(f"{'row':<28} {'vision s':>9} {'LLM s':>8} {'total s':>8} {'vs full':>8} {'e2e TFLOPs':>11} {'vs full':>8}")
    for name, (v, l) in rows.items():
        total = v + l
        ref = sum(rows[full_key])
        print(f"{name:<28} {v:>9.3f} {l:>8.3f} {total:>8.3f} {ref / total:>7.2f}x {flops[name] / 1e12:>11.3f} "
              f"{flops[full_key] / flops[name]:>7.2f}x")
    print("router placement (routing pass alone, base layout):")
    for read in args.read_after:
        kinds = "".join({"sa": "S", "ca": "C", "text": "."}[k.value] for k in plan.layer_kinds(())[: read + 1])
        print(f"  read after layer {read:>2} ({kinds}): {med[f'route@{read}']:.3f} s, "
              f"{router_overhead_flops(_with_read(routed, read), n_base, N_TEXT) / 1e9:.2f} GFLOPs")
    print(json.dumps({"geometry": args.geometry, "dtype": args.dtype, "size": args.size, "sa": args.sa, "batch": args.batch,
                      "threads": torch.get_num_threads(), "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
                      "device": where, "torch": torch.__version__,
                      "build_seconds": round(build_seconds, 1), "n_visual_full": n_full, "n_visual_base": n_base,
                      "base_view_reused": reuse, "parts_seconds": {k: round(v, 4) for k, v in med.items()},
                      "rows_seconds": {k: [round(v, 4), round(l, 4)] for k, (v, l) in rows.items()},
                      "rows_flops": {k: float(v) for k, v in flops.items()}}))
    return 0


def _with_read(model, read):
    model.config.router["read_after_layer"] = read
    return model


if __name__ == "__main__":
    raise SystemExit(main())
