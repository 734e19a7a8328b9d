"""``visor convert SRC OUT``: a LLaVA-OneVision checkpoint -> a VISOR checkpoint (fresh CA blocks)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from visor.cli.common import DTYPES, add_dtype, print_json_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a LLaVA-OneVision checkpoint into a VISOR checkpoint",
        description="Build a VISOR model from a LLaVA-OneVision checkpoint in Hugging Face format (local folder, "
        "or hub id where a network exists). Original weights are copied untouched; cross-attention blocks are new "
        "(zero output projection). Tokenizer, image processor and chat template files are copied along.",
    )
    parser.add_argument("src", help="LLaVA-OneVision checkpoint folder (or hub id)")
    parser.add_argument("out", help="output folder for the VISOR checkpoint")
    parser.add_argument("--plan", default="default",
                        help="layer plan: 'default' (L/3 CA at 3i+1, L/3 SA slots at 3i+2), 'all-sa' (every layer SA, "
                        "no CA: the original model), or 'ca=1,4,7;sa=2,5,8' (explicit layer indices)")
    add_dtype(parser, default="fp32")
    parser.set_defaults(func=run)


def parse_plan(text: str, num_layers: int):
    from visor.model.plan import LayerPlan

    text = text.strip().lower()
    if text == "default":
        return LayerPlan.default(num_layers)
    if text in ("all-sa", "all_sa", "all-self-attention"):
        return LayerPlan.all_self_attention(num_layers)
    parts = {}
    for chunk in text.split(";"):
        if "=" not in chunk:
            raise ValueError(f"cannot parse plan {text!r}: expected 'default', 'all-sa' or 'ca=1,4;sa=2,5'")
        key, value = chunk.split("=", 1)
        parts[key.strip()] = tuple(int(v) for v in value.split(",") if v.strip())
    unknown = set(parts) - {"ca", "sa"}
    if unknown:
        raise ValueError(f"unknown plan field(s) {sorted(unknown)}: use 'ca' and 'sa'")
    return LayerPlan(num_layers, parts.get("ca", ()), parts.get("sa", ()))


def run(args: argparse.Namespace) -> int:
    from transformers import LlavaOnevisionConfig

    from visor.convert.llava_onevision import _resolve_folder, convert_llava_onevision

    folder = _resolve_folder(args.src)
    num_layers = LlavaOnevisionConfig.from_pretrained(str(folder)).text_config.num_hidden_layers
    plan = parse_plan(args.plan, num_layers)
    model = convert_llava_onevision(folder, plan=plan, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copied = []
    for pattern in ("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "preprocessor_config.json", "processor_config.json", "chat_template.*", "generation_config.json"):
        for file in folder.glob(pattern):
            if not (out / file.name).exists() or file.name == "generation_config.json":
                shutil.copy2(file, out / file.name)
                copied.append(file.name)
    print(f"converted {folder} -> {out}")
    print(f"plan: {plan.describe()}  (S = SA slot, C = cross-attention, . = text-only)")
    params = sum(p.numel() for p in model.parameters())
    new = sum(p.numel() for n, p in model.named_parameters() if ".cross_attn." in n)
    print(f"parameters: {params:,} ({new:,} new in cross-attention blocks, {100 * new / params:.2f}%)")
    print_json_line({"out": str(out), "plan": plan.to_dict(), "parameters": params, "new_parameters": new, "copied": sorted(copied)})
    return 0
