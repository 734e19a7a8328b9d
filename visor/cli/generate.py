"""``visor generate``: answer a prompt about an image with a VISOR (or LLaVA-OV) checkpoint."""

from __future__ import annotations

import argparse
import time

import torch

from visor.cli.common import DTYPES, add_config_choice, add_dtype, print_json_line, resolve_config_choice


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an answer for an image and a prompt",
        description="Generate text with a VISOR checkpoint (a LLaVA-OneVision folder is converted on the fly "
        "with the default plan). Prints the answer, then one JSON line.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (VISOR, or LLaVA-OneVision)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    parser.add_argument("--prompt", required=True, help="the question; the chat template and image tags are added")
    parser.add_argument("--raw-prompt", action="store_true", help="use --prompt verbatim (it must contain one <image> per image)")
    add_config_choice(parser)
    parser.add_argument("--route", action="store_true",
                        help="let the checkpoint's router pick the SA slots (and, for a resolution router, whether "
                             "the tiles are encoded at all: visor.routing.resolution)")
    parser.add_argument("--budget", type=float, default=None, metavar="LAMBDA",
                        help="router cost bias (implies --route): > 0 cheaper, < 0 richer (default 0)")
    parser.add_argument("--resolution", choices=("full", "base"), default=None,
                        help="full: base view + anyres tiles (default); base: the base view only (visor.model.resolution)")
    parser.add_argument("--reduce", default=None, metavar="NAME[:AMOUNT]",
                        help="visual-token reducer: pooling, visionzip, vispruner, hired (before the LLM), fastv, pdrop "
                             "(inside it); AMOUNT is the kept fraction ('0.25'), a factor ('4x') or a percentage "
                             "(default: the method's published setting; see visor.compression.registry)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum tokens to generate (default 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filtering (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus filtering (with --do-sample)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="repetition penalty (> 1 discourages repeats)")
    parser.add_argument("--stop", action="append", default=None, help="stop string; repeat for several")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_dtype(parser, default="fp32")
    parser.set_defaults(func=run)


def load_model(folder: str, dtype: torch.dtype = torch.float32):
    """A VISOR checkpoint as saved; a LLaVA-OV checkpoint as the original model (every layer SA)."""
    from visor.convert.llava_onevision import load_checkpoint

    return load_checkpoint(folder, dtype)[0]


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from visor.model.plan import format_slots
    from visor.processing.processor import VisorProcessor, load_image

    dtype = DTYPES[args.dtype]
    model = load_model(args.model, dtype)
    processor = VisorProcessor.from_pretrained(args.model)
    route = args.route or args.budget is not None
    routes_resolution = _check_route_options(args, model) if route else False
    active = None if route else resolve_config_choice(args, model.plan)
    reducer = None
    if args.reduce:
        from visor.compression import build_reducer

        try:
            reducer = build_reducer(args.reduce)
        except ValueError as err:
            raise SystemExit(f"visor generate: --reduce: {err}") from err
    images = [load_image(path) for path in args.image]
    prompt = args.prompt if args.raw_prompt else processor.chat_prompt(args.prompt, num_images=len(images))
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    options = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
        tokenizer=processor.tokenizer, streamer=streamer, eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=processor.tokenizer.pad_token_id, generator=torch.Generator().manual_seed(args.seed), reducer=reducer,
    )
    resolution = args.resolution or "full"
    start = time.perf_counter()
    if routes_resolution:  # route on the base view; tiles encoded only if the router asks for them
        from visor.data.batch import Batcher, Sample
        from visor.routing.resolution import generate_on_request

        batcher = Batcher.for_model(model, processor.tokenizer, processor.image_processor)
        sample = Sample(images, [{"from": "human", "value": "<image>\n" * len(images) + args.prompt}])
        on_request = generate_on_request(model, batcher, [sample], budget=args.budget or 0.0, **options)
        sequences, inputs = on_request.sequences, on_request.batch
        active, resolution = on_request.configurations[0].active_sa, on_request.configurations[0].resolution
    else:
        inputs = processor(prompt, [images] if images else None, resolution=resolution)
        if route:
            with torch.no_grad():
                features = model.encode_images(inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"],
                                               inputs.get("image_tiled")) if images else []
                active = tuple(model.route(inputs["input_ids"], inputs["attention_mask"], image_features=features,
                                           batch_num_images=inputs.get("batch_num_images"), budget=args.budget or 0.0)[0])
            options["image_features"] = features
        sequences = model.generate(**inputs, active_sa=active, **options)
    seconds = time.perf_counter() - start
    new_tokens = sequences[0, inputs["input_ids"].shape[1]:]
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
    if not args.stream:
        print(answer)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print_json_line({
        "answer": answer, "active_sa": format_slots(active), "layers": model.plan.describe(active),
        "route": route, "budget": args.budget, "resolution": resolution,
        "visual_tokens": n_visual, "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "reduce": reducer.describe() if reducer else None,
        "visual_tokens_per_layer": _visual_tokens_per_layer(model, reducer, inputs, n_visual),
        "new_tokens": int(new_tokens.numel()), "seconds": round(seconds, 3),
    })
    return 0


def _check_route_options(args: argparse.Namespace, model) -> bool:
    """Validate --route/--budget against the other options; whether the router also picks the resolution."""
    from visor.routing.router import routes_resolution

    if not getattr(model.config, "router", None):
        raise SystemExit("visor generate: --route/--budget: this checkpoint has no router (train one with "
                         "`visor route train`), choose --active-sa or --sa-count instead")
    if args.active_sa is not None or args.sa_count is not None:
        raise SystemExit("visor generate: --route/--budget let the router choose the SA slots: drop --active-sa/--sa-count")
    on_request = routes_resolution(model)
    if on_request and args.resolution is not None:
        raise SystemExit("visor generate: this checkpoint's router picks the resolution itself: drop --resolution")
    if on_request and args.raw_prompt:
        raise SystemExit("visor generate: a resolution router lays the prompt out twice (base view, then tiles) from "
                         "the chat turns: --raw-prompt cannot be used with it")
    return on_request


def _visual_tokens_per_layer(model, reducer, inputs, n_visual: int) -> list[int]:
    """Visual tokens each decoder layer carries for this prompt (every layer: ``n_visual`` without a reducer)."""
    num_layers = model.config.text_config.num_hidden_layers
    if reducer is None or n_visual == 0:
        return [n_visual] * num_layers
    if reducer.stage == "pre_llm":
        from visor.compression.cues import image_layouts

        layouts = image_layouts(model.config, inputs["image_sizes"], inputs.get("batch_num_images"))
        return [sum(reducer.kept_count(layout) for layout in layouts)] * num_layers
    return reducer.visual_tokens_per_layer(num_layers, n_visual)
