"""Strict loading of saved VISOR checkpoints.

``transformers``' ``from_pretrained`` initialises missing tensors randomly and only warns; for a model
whose point is reproducing measured accuracy that is a silent failure. Here a folder with missing,
unexpected or mis-shaped tensors is an error that names them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedModel


class CheckpointError(ValueError):
    """A checkpoint folder that cannot give the model it claims to hold."""


def load_visor_checkpoint(cls, path: str | os.PathLike, *args, **kwargs):
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{folder} has no config.json: not a saved checkpoint")
        if not any(folder.glob("*.safetensors")):
            raise CheckpointError(f"{folder} has no safetensors weights")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type == "llava_onevision":
            raise CheckpointError(
                f"{folder} is a LLaVA-OneVision checkpoint: convert it with "
                f"VisorForConditionalGeneration.from_llava_onevision (or `visor convert`)"
            )
    want_info = kwargs.pop("output_loading_info", False)
    try:
        model, info = PreTrainedModel.from_pretrained.__func__(cls, str(path), *args, output_loading_info=True, **kwargs)
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"cannot load {path}: {err}") from err
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(info.get(kind) or [])
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        keys = [k for k in keys if (k[0] if isinstance(k, tuple) else k) not in tied]
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
    if info.get("error_msgs"):
        problems.append(f"errors: {info['error_msgs'][:3]}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
    model.eval()
    return (model, info) if want_info else model
