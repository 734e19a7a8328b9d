"""Build a VISOR model from a LLaVA-OneVision checkpoint in Hugging Face format.

The original weights are copied untouched (renamed by ``visor.convert.keys``); the new cross-attention
blocks are initialised fresh (zero output projection). Sources: a local folder, a hub id (only where a
network exists), a ``LlavaOnevisionConfig``/``config.json`` (structure only, e.g. on the meta device),
or an in-memory ``LlavaOnevisionForConditionalGeneration``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from transformers import LlavaOnevisionConfig, PreTrainedModel

from visor.convert.keys import hf_to_visor_key, is_visor_only
from visor.model.config import VisorConfig
from visor.model.plan import LayerPlan


def visor_config_from_llava(llava_config: LlavaOnevisionConfig, plan: LayerPlan | None = None, **overrides) -> VisorConfig:
    """A ``VisorConfig`` with every LLaVA-OV field of ``llava_config`` and the given (or default) plan."""
    data = llava_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    num_layers = llava_config.text_config.num_hidden_layers
    plan = plan or LayerPlan.default(num_layers)
    if plan.num_layers != num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} layers but the checkpoint's LLM has {num_layers} layers")
    data.update(
        cross_attention_layers=list(plan.cross_attention_layers),
        self_attention_layers=list(plan.self_attention_layers),
        slot_order=list(plan.slot_order),
    )
    data.update(overrides)
    return VisorConfig(**data)


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {folder} (expected model.safetensors or an index)")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = folder / shard
        if not path.exists():
            raise FileNotFoundError(f"checkpoint shard {path} listed in the index is missing")
        state.update(load_file(str(path)))
    return state


def _resolve_folder(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    if path.suffix == ".json" and path.exists():
        return path.parent
    try:  # a hub id: only works where a network exists
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
    except Exception as err:  # noqa: BLE001 - surface one clear message
        raise FileNotFoundError(
            f"{source!r} is neither a local LLaVA-OneVision folder nor a reachable hub id ({type(err).__name__}: {err})"
        ) from err


def convert_llava_onevision(
    source,
    plan: LayerPlan | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
):
    """Convert ``source`` into a ``VisorForConditionalGeneration`` (see module docstring)."""
    from visor.model.modeling import VisorForConditionalGeneration

    state_dict = None
    if isinstance(source, PreTrainedModel):
        llava_config = source.config
        state_dict = source.state_dict()
    elif isinstance(source, LlavaOnevisionConfig):
        llava_config = source
    else:
        path = Path(source)
        if path.suffix == ".json" and path.is_file():
            llava_config = LlavaOnevisionConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else LlavaOnevisionConfig.from_json_file(str(path))
        else:
            folder = _resolve_folder(source)
            llava_config = LlavaOnevisionConfig.from_pretrained(str(folder))
            state_dict = load_hf_state_dict(folder)
    config = visor_config_from_llava(llava_config, plan, **config_overrides)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = VisorForConditionalGeneration(config)
        return model.to(dtype) if dtype is not None else model
    model = VisorForConditionalGeneration(config)
    if state_dict is not None:
        load_llava_weights(model, state_dict)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_llava_weights(model, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a Hugging Face LLaVA-OV state dict into ``model``; every original tensor must be present."""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in hf_state_dict.items():
        target = hf_to_visor_key(key)
        if target is None or target not in own:
            unknown.append(key)
            continue
        if own[target].shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(own[target].shape)} for {target}: the config does not match the weights"
            )
        mapped[target] = tensor
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    missing = [k for k in own if k not in mapped and not is_visor_only(k) and k != tied]
    if missing:
        raise ValueError(f"the LLaVA-OV checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    if unknown:
        raise ValueError(f"the LLaVA-OV checkpoint has {len(unknown)} tensor(s) VISOR cannot place, e.g. {unknown[:5]}")
    model.load_state_dict(mapped, strict=False)
    if tied:
        model.tie_weights()


def load_checkpoint(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """``(model, kind)`` for any checkpoint folder: a LLaVA-OV folder becomes the *original* model
    (``LayerPlan.all_self_attention``: every layer self-attention, no cross-attention), a VISOR folder
    loads as saved. ``kind`` is ``"llava_onevision"`` or ``"visor"``."""
    from visor.model.modeling import VisorForConditionalGeneration

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "llava_onevision":
        num_layers = LlavaOnevisionConfig.from_pretrained(str(folder)).text_config.num_hidden_layers
        model = convert_llava_onevision(folder, plan=LayerPlan.all_self_attention(num_layers), dtype=dtype)
        return model.eval(), "llava_onevision"
    return VisorForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval(), "visor"
