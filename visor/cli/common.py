"""Argument helpers shared by CLI verbs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_config_choice(parser: argparse.ArgumentParser) -> None:
    """``--active-sa SLOTS`` | ``--sa-count K``: which SA slots run."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--active-sa", metavar="SLOTS", default=None,
                       help="SA slot numbers joined by '+', e.g. '0+2'; 'none' = cross-attention only; 'all' = every slot (default: all)")
    group.add_argument("--sa-count", metavar="K", type=int, default=None,
                       help="switch on the first K SA slots in the plan's slot order")


def resolve_config_choice(args: argparse.Namespace, plan) -> tuple[int, ...]:
    if args.sa_count is not None:
        return plan.first_slots(args.sa_count)
    return plan.resolve_active(args.active_sa)


def add_dtype(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default, help=f"weights/compute dtype (default {default})")


def print_json_line(obj: dict) -> None:
    """The last line of a verb's output: one JSON object."""
    print(json.dumps(obj, sort_keys=True, default=str))


def add_image_size(parser: argparse.ArgumentParser) -> None:
    """``--image-size PX``: the procedural benchmark's canvas (default: the one the model was trained on)."""
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="synth: image side in pixels (default: the canvas the model was trained on, from its "
                             "recipe.json or its shipped recipe, else 192); large shapes scale with it, small print "
                             "does not (SynthConfig.with_image_size)")


def trained_canvas(model_dir: str | Path) -> int | None:
    """The procedural benchmark canvas a model was trained on (``data.synth_image_size``): from the
    ``recipe.json`` a finished training run writes beside its weights, else, for a shipped checkpoint, from
    the recipe its ``MANIFEST.json`` names; None when neither says (SynthConfig's default, 192 px)."""
    import yaml

    folder = Path(model_dir)
    try:
        if (folder / "recipe.json").is_file():
            return (json.loads((folder / "recipe.json").read_text()).get("data") or {}).get("synth_image_size")
        manifest = folder.parent / "MANIFEST.json"
        if manifest.is_file():
            for entry in json.loads(manifest.read_text()).get("checkpoints", {}).values():
                if Path(entry.get("path", "")).name == folder.name and entry.get("recipe"):
                    recipe = yaml.safe_load((folder.parent / entry["recipe"]).read_text())
                    return (recipe.get("data") or {}).get("synth_image_size")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return None


def synth_config_for(model_dir: str | Path, image_size: int | None, prog: str):
    """The SynthConfig to evaluate ``model_dir`` on: ``--image-size`` when given, else the canvas the model was
    trained on (announced on stderr), else the default."""
    from visor.data.synth.config import SynthConfig

    size = image_size if image_size is not None else trained_canvas(model_dir)
    if image_size is None and size is not None:
        print(f"{prog}: synth images of {size} px, the canvas {model_dir} was trained on (--image-size overrides)",
              file=sys.stderr)
    return SynthConfig().with_image_size(size)
