"""Training: recipes, the loop on tiny models, stage semantics, distributed equivalence, fault tolerance."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from visor.train.checkpoint import RunLock, latest_checkpoint, write_checkpoint
from visor.train.recipe import Recipe, build, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# a model that trains in seconds: 192 px procedural images, 64 px base view, patch 16 (172 visual tokens)
TINY_MODEL = dict(image_size=64, patch_size=16, vision_layers=1, vision_hidden=16, vision_heads=2, vision_mlp=32,
                  text_layers=6, hidden=32, heads=4, kv_heads=2, mlp=64)


def tiny_recipe(tmp_path: Path, name: str, **overrides) -> Path:
    data = dict(kind="base", out_dir=str(tmp_path / name), model=TINY_MODEL, data={"val_n": 4, "families": ["color", "side"]},
                optim={"lr": 3e-3, "warmup_steps": 2}, global_batch=4, micro_batch=2, max_steps=6, save_every=2,
                log_every=1, precision="fp32", threads=1)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


# ---------------------------------------------------------------------- recipes
def test_every_shipped_recipe_parses():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.global_batch % recipe.micro_batch == 0
    paper = load_recipe(ROOT / "recipes" / "visor-stage2-llava-ov-0.5b.yaml")
    assert paper.global_batch == 128 and paper.optim.weight_decay == 0.0 and paper.distributed == "fsdp"


def test_bad_recipes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        build(Recipe, {"kind": "base", "out_dir": "x", "learning_rate": 1})
    with pytest.raises(TypeError, match="max_steps"):
        build(Recipe, {"kind": "base", "out_dir": "x", "max_steps": "many"})
    with pytest.raises(ValueError, match="kind"):
        build(Recipe, {"kind": "stage3", "out_dir": "x"})
    with pytest.raises(ValueError, match="multiple"):
        build(Recipe, {"kind": "base", "out_dir": "x", "global_batch": 10, "micro_batch": 4})
    with pytest.raises(ValueError, match="init"):
        build(Recipe, {"kind": "visor-stage1", "out_dir": "x"})
    recipe = load_recipe(tiny_recipe(tmp_path, "r"), ["optim.lr=3e-4", "max_steps=9"])
    assert recipe.optim.lr == 3e-4 and recipe.max_steps == 9
    for weights, match in (("{code: 2}", "outside the mix"), ("{side: 0}", "positive integer"), ("[side]", "does not match"),
                           ("{side: two}", "does not match")):
        with pytest.raises((TypeError, ValueError), match=match):
            load_recipe(tiny_recipe(tmp_path, "w"), [f"data.family_weights={weights}"])
    with pytest.raises(ValueError, match="synth"):
        build(Recipe, {"kind": "base", "out_dir": "x", "data": {"source": "llava", "path": "a.jsonl", "family_weights": {"code": 2}}})


def test_family_weights_shape_the_training_mix_not_validation(tmp_path):
    from visor.train.loop import SampleSource

    recipe = load_recipe(tiny_recipe(tmp_path, "w"), ["data.family_weights={side: 3}"])
    assert recipe.data.family_weights == {"side": 3}
    train = [SampleSource(recipe).item(i).family for i in range(8)]
    assert train.count("side") == 6 and train.count("color") == 2
    val = [SampleSource(recipe, split="val").item(i).family for i in range(4)]
    assert val == ["color", "side"] * 2


# ---------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny base model trained for 30 steps (shared by the tests below)."""
    from visor.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("base")
    recipe = load_recipe(tiny_recipe(tmp, "base", max_steps=40, save_every=10, log_every=2))
    final = Trainer(recipe, progress=False).train()
    return tmp / "base", final


def test_base_loss_goes_down_and_exports_llava_onevision(base_run):
    from transformers import LlavaOnevisionForConditionalGeneration

    run_dir, final = base_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert (run_dir / "loss.png").exists()
    evals = [r for r in rows if "eval" in r]
    assert evals and evals[-1]["eval"]["n_items"] == 4
    # the answer loss is logged per family beside exact match, and averaged over the families present
    last = evals[-1]["eval"]
    assert set(last["answer_nll"]) == {"color", "side"} and all(0 < v < 20 for v in last["answer_nll"].values())
    assert last["easy_answer_nll"] == pytest.approx(sum(last["answer_nll"].values()) / 2)
    assert "hard_answer_nll" not in last
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(final)
    assert hf.config.text_config.num_hidden_layers == 6
    # the exported baseline and the training-time weights are the same model
    from visor import LayerPlan, VisorForConditionalGeneration
    from visor.eval.harness import evaluate, synth_items
    from visor.train.models import image_processor_for
    from transformers import AutoTokenizer

    model = VisorForConditionalGeneration.from_llava_onevision(final, plan=LayerPlan.all_self_attention(6))
    tokenizer = AutoTokenizer.from_pretrained(final)
    result = evaluate(model, tokenizer, image_processor_for(model.config), synth_items("val", 4, families=["color", "side"]), progress=False)
    assert result.summary["n_items"] == 4 and result.summary["n_skipped"] == 0


def test_vision_init_takes_the_tower_of_a_llava_onevision_checkpoint(base_run, tmp_path):
    """A new language model on a trained baseline's tower: the tower is the checkpoint's, bit for bit; the
    language model starts afresh."""
    from visor.convert.llava_onevision import convert_llava_onevision
    from visor.train.loop import Trainer

    _, final = base_run
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, "v", vision_init=str(final), freeze_vision=True)), progress=False)
    trainer.build()
    trained = convert_llava_onevision(final)
    for name, value in trained.vision_tower.state_dict().items():
        assert torch.equal(trainer.model.vision_tower.state_dict()[name], value), name
    q = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trainer.model.state_dict()[q], trained.state_dict()[q])


def test_lvlm_pixels_are_normalised_as_the_tower_was_pretrained(tmp_path):
    """The image processor of a model we build gives the vision tower the pixels its dense pre-training
    used (SigLIP's 0.5 mean/std, as LLaVA-OV's preprocessor_config): a 64 px image's base view through the
    processor equals the pre-training batch's normalisation of the same image."""
    from transformers import LlavaOnevisionConfig

    from visor.train.loop import DenseVisionTask
    from visor.train.models import image_processor_for

    recipe = load_recipe(tiny_recipe(tmp_path, "v", kind="vision", model={**TINY_MODEL, "patch_size": 8}))
    task = DenseVisionTask(recipe)
    item = task.source.item(0)  # index 0 is a base view: the whole image resized to 64 px
    resized = item.image.resize((64, 64))
    expected = task.batch([0])["pixel_values"][0]
    config = LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 8},
                                  image_grid_pinpoints=[[64, 64]])
    processor = image_processor_for(config)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5] and list(processor.image_std) == [0.5, 0.5, 0.5]
    pixels = processor(images=[resized], return_tensors="pt")["pixel_values"][0, 0]
    assert torch.allclose(pixels, expected, atol=1e-5)


def test_vision_shape_head_is_opt_in_and_trains(tmp_path):
    """`vision_shape_weight` > 0 adds a per-patch shape-kind head: its targets are in the batch, its loss is
    part of the total and its accuracy is evaluated; without it the model and batches are as before."""
    from visor.train.loop import Trainer

    plain = load_recipe(tiny_recipe(tmp_path, "plain", kind="vision", model={**TINY_MODEL, "patch_size": 8}, max_steps=2))
    trainer = Trainer(plain, progress=False)
    trainer.build()
    assert trainer.model.shape is None and "shape" not in trainer.task.batch([0, 1])
    recipe = load_recipe(tiny_recipe(tmp_path, "shape", kind="vision", model={**TINY_MODEL, "patch_size": 8}, max_steps=2,
                                     vision_shape_weight=0.5))
    trainer = Trainer(recipe, progress=False)
    trainer.build()
    batch = trainer.task.batch([0, 1, 2, 3])
    assert batch["shape"].shape == batch["color"].shape and (batch["shape"] > 0).any()
    assert ((batch["shape"] > 0) <= (batch["color"] > 0)).all()  # a shape's patches are coloured
    loss = torch.no_grad()(trainer.task.loss)
    with_shape, _ = loss(trainer.model, batch, 0)
    head = trainer.model.shape
    head.weight.data.zero_(), head.bias.data.zero_()
    uniform, _ = loss(trainer.model, batch, 0)
    trainer.model.shape = None  # what the total is without the head's term
    recipe.vision_shape_weight = 0.0
    without, _ = loss(trainer.model, {k: v for k, v in batch.items() if k != "shape"}, 0)
    # none + 4 kinds: a zeroed head predicts uniformly, cross-entropy log(5) per patch, weighted 0.5
    assert head.out_features == 5
    assert float(uniform - without) == pytest.approx(0.5 * batch["shape"].numel() * float(torch.log(torch.tensor(5.0))),
                                                     rel=1e-4)
    assert float(with_shape) != pytest.approx(float(uniform))
    trainer.model.shape, recipe.vision_shape_weight = head, 0.5
    assert "shape_acc" in trainer.task.evaluate(trainer.model, n=8)
    with pytest.raises(ValueError, match="vision_shape_weight"):
        load_recipe(tiny_recipe(tmp_path, "bad", kind="vision", vision_shape_weight=-1))


def test_base_shape_head_trains_beside_the_answer_loss_and_is_not_exported(tmp_path):
    """A base recipe with `vision_shape_weight` trains a per-patch shape head on the LVLM's tower: its labels follow
    the processor's crop layout (base view, then the tiles row by row), its loss is added to the answer loss per
    target token, step checkpoints keep it (a resume needs it) and the exported LLaVA-OV model does not."""
    import numpy as np
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor.data.synth.dense import dense_targets
    from visor.train.loop import Trainer
    from visor.train.models import SIGLIP_MEAN

    recipe = load_recipe(tiny_recipe(tmp_path, "shape", vision_shape_weight=0.5, max_steps=4, save_every=2,
                                     model={**TINY_MODEL, "patch_size": 8}))
    trainer = Trainer(recipe, progress=False)
    trainer.build()
    batch = trainer.task.batch([0, 1])
    items = [trainer.task.source.item(i) for i in (0, 1)]
    # 192 px images: base view + 3 x 3 tiles of 64 px, 8 x 8 patches each
    assert batch["pixel_values"].shape[:2] == (2, 10) and batch["shape_targets"].shape == (20, 64)
    for n, item in enumerate(items):
        image = np.asarray(item.image, dtype=np.float32) / 255.0
        base = np.asarray(item.image.resize((64, 64), resample=3), dtype=np.float32) / 255.0
        crops = [base] + [image[r:r + 64, c:c + 64] for r in (0, 64, 128) for c in (0, 64, 128)]
        for k, crop in enumerate(crops):
            expected = torch.from_numpy((crop - SIGLIP_MEAN[0]) / 0.5).permute(2, 0, 1)
            assert torch.allclose(batch["pixel_values"][n, k], expected, atol=0.02 if k == 0 else 1e-5), (n, k)
        labels = batch["shape_targets"][10 * n:10 * (n + 1)]
        full = dense_targets(item, 8).shape
        assert torch.equal(labels[4], torch.from_numpy(full[8:16, 0:8]).flatten())  # tile row 1, column 0
        assert torch.equal(labels[0], torch.from_numpy(dense_targets(item, 8, image_size=(64, 64)).shape).flatten())
    assert (batch["shape_targets"] > 0).any()
    from visor.train.auxiliary import crop_shape_targets

    with pytest.raises(ValueError, match="grid resolution"):  # a 192 px image on a grid without 192 x 192: resized
        crop_shape_targets(items[0], 64, 8, [[64, 64], [128, 128]])

    loss = torch.no_grad()(trainer.task.loss)
    head = trainer.model.aux_shape_head
    head.proj.weight.data.zero_(), head.proj.bias.data.zero_()
    total, tokens = loss(trainer.model, batch, 0)
    answer, _ = loss(trainer.model, {k: v for k, v in batch.items() if k != "shape_targets"}, 0)
    # none + 4 kinds: a zeroed head predicts uniformly, cross-entropy log(5), weighted 0.5 per target token
    assert float(total - answer) == pytest.approx(0.5 * math.log(5) * tokens, rel=1e-4)

    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    final = Trainer(recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "shape" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["shape_head_ce"] < 5 for r in rows if "loss" in r)
    step = load_file(str(latest_checkpoint(tmp_path / "shape") / "model.safetensors"))
    assert {"aux_shape_head.proj.weight", "aux_shape_head.proj.bias"} <= set(step)
    assert not torch.equal(step["vision_tower.encoder.layers.0.mlp.fc1.weight"],
                           before["vision_tower.encoder.layers.0.mlp.fc1.weight"])
    exported = load_file(str(final / "model.safetensors"))
    assert not any("aux_" in k for k in exported)
    LlavaOnevisionForConditionalGeneration.from_pretrained(final)
    resumed = Trainer(load_recipe(tiny_recipe(tmp_path, "shape", vision_shape_weight=0.5, max_steps=6, save_every=2,
                                              model={**TINY_MODEL, "patch_size": 8})), resume=True, progress=False)
    resumed.train()
    assert resumed.start_step == 4
    for bad in (dict(freeze_vision=True), dict(kind="visor-stage1", init=str(final))):
        with pytest.raises(ValueError, match="vision_shape_weight"):
            load_recipe(tiny_recipe(tmp_path, "bad", vision_shape_weight=0.5, **bad))


def test_mid_run_checkpoint_evaluates_with_the_cli(base_run, tmp_path, capsys):
    """Every step checkpoint carries its tokenizer and image processor: `visor eval` runs on it mid-run."""
    from visor.cli.main import main

    run_dir, _ = base_run
    checkpoint = latest_checkpoint(run_dir)
    assert (checkpoint / "tokenizer_config.json").exists() and (checkpoint / "preprocessor_config.json").exists()
    args = ["eval", "--model", str(checkpoint), "--data", "synth", "--split", "val", "--n", "4",
            "--families", "color", "side", "--no-progress", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_items"] == 4 and summary["n_skipped"] == 0


def test_base_continues_from_its_own_step_checkpoint_or_the_export(base_run, tmp_path):
    """A base recipe's ``init`` takes the exported LLaVA-OV folder or one of the run's own step checkpoints
    (VISOR format, every layer SA): both start from the same weights; a model with CA layers is refused."""
    from transformers import AutoTokenizer

    from visor import VisorForConditionalGeneration
    from visor.train.models import build_llava_base

    run_dir, final = base_run
    last_step = latest_checkpoint(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(final)
    from_step = build_llava_base(load_recipe(tiny_recipe(tmp_path, "c1", init=str(last_step))), tokenizer)
    from_export = build_llava_base(load_recipe(tiny_recipe(tmp_path, "c2", init=str(final))), tokenizer)
    step_state, export_state = from_step.state_dict(), from_export.state_dict()
    assert set(step_state) == set(export_state)
    for name, tensor in step_state.items():
        assert torch.equal(tensor, export_state[name]), name
    assert from_step.training and not from_step.plan.cross_attention_layers
    visor = VisorForConditionalGeneration.from_llava_onevision(final)  # default plan: CA layers
    visor.save_pretrained(tmp_path / "with-ca")
    with pytest.raises(ValueError, match="cross-attention"):
        build_llava_base(load_recipe(tiny_recipe(tmp_path, "c3", init=str(tmp_path / "with-ca"))), tokenizer)


def test_second_trainer_on_the_same_run_folder_is_refused(tmp_path):
    from visor.train.loop import Trainer

    recipe = load_recipe(tiny_recipe(tmp_path, "locked", max_steps=2))
    with RunLock(tmp_path / "locked"):
        with pytest.raises(RuntimeError, match=r"another training process \(pid \d+\) is writing to"):
            Trainer(recipe, progress=False).train()
        assert not (tmp_path / "locked" / "checkpoints").exists()  # refused before touching anything
    # released (by exit or by the kernel when the holder dies): training proceeds
    assert Trainer(recipe, progress=False).train() is not None


def test_precision_auto_resolves_for_the_machine_and_is_recorded(tmp_path, monkeypatch, capsys):
    from visor.train.loop import Trainer

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)  # a CPU without AMX
    recipe = load_recipe(tiny_recipe(tmp_path, "auto", max_steps=1, save_every=1, precision="auto"))
    Trainer(recipe, progress=False).train()
    assert json.loads((tmp_path / "auto" / "final" / "recipe.json").read_text())["precision"] == "fp32"
    assert "precision auto -> fp32" in capsys.readouterr().out
    Trainer(load_recipe(tiny_recipe(tmp_path, "bf16", precision="bf16")), progress=False)  # asked bf16: runs, warned
    assert "without AMX" in capsys.readouterr().out
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert Trainer(load_recipe(tiny_recipe(tmp_path, "amx", precision="auto")), progress=False).recipe.precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        load_recipe(tiny_recipe(tmp_path, "bad", precision="fp16"))


def test_stage1_trains_only_the_new_blocks(base_run, tmp_path):
    from visor import VisorForConditionalGeneration
    from visor.train.loop import Trainer

    _, final = base_run
    recipe = load_recipe(tiny_recipe(tmp_path, "s1", kind="visor-stage1", init=str(final), max_steps=3, save_every=3))
    out = Trainer(recipe, progress=False).train()
    before = VisorForConditionalGeneration.from_llava_onevision(final).state_dict()
    after = VisorForConditionalGeneration.from_pretrained(out).state_dict()
    assert set(before) == set(after)
    changed_new = 0
    for name, tensor in before.items():
        if ".cross_attn." in name:
            changed_new += int(not torch.equal(tensor, after[name]))
        else:
            assert torch.equal(tensor, after[name]), f"original weight {name} changed in stage 1"
    assert changed_new > 0


def test_universal_sampling_covers_viable_set(base_run, tmp_path):
    from visor import VisorForConditionalGeneration
    from visor.train.loop import Trainer, sample_config

    viable = [(), (0,), (0, 1)]
    recipe = build(Recipe, {"kind": "base", "out_dir": "x"})
    counts = Counter(sample_config(recipe, viable, step) for step in range(3000))
    assert set(counts) == set(viable)
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values())
    # a short stage-2 run logs the configuration it sampled at each step
    _, final = base_run
    stage1 = VisorForConditionalGeneration.from_llava_onevision(final)
    stage1.config.viable_configs = [list(v) for v in viable]
    stage1.save_pretrained(tmp_path / "stage1")
    recipe = load_recipe(tiny_recipe(tmp_path, "s2", kind="visor-stage2", init=str(tmp_path / "stage1"), max_steps=12,
                                     save_every=12, tokenizer=str(final)))
    Trainer(recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    seen = {tuple(r["active_sa"]) for r in rows}
    assert seen == set(viable)


def test_stage2_draws_a_reducer_per_step_for_visor_tr(base_run, tmp_path, monkeypatch):
    """``reducers`` (VISOR-TR): each step draws one, a pure function of (seed, step); the model's forward gets it, the
    prompt is shortened by it, and the loss stays finite over the same target tokens."""
    from visor import VisorForConditionalGeneration
    from visor.train.loop import Trainer, sample_reducer

    recipe = build(Recipe, {"kind": "visor-stage2", "out_dir": "x", "init": "y", "freeze_vision": True, "reducers": ["none", "pooling:2x"]})
    draws = Counter(sample_reducer(recipe, step) for step in range(2000))
    assert set(draws) == {None, "pooling:2x"} and abs(draws[None] / 2000 - 0.5) < 0.05
    assert [sample_reducer(recipe, s) for s in range(20)] == [sample_reducer(recipe, s) for s in range(20)]
    for bad, match in ((["pooling:3q"], "reduction amount"), (["fastv:0.5"], "inside the LLM"), ([], "non-empty")):
        with pytest.raises(ValueError, match=match):
            build(Recipe, {"kind": "visor-stage2", "out_dir": "x", "init": "y", "freeze_vision": True, "reducers": bad})
    with pytest.raises(ValueError, match="base or visor-stage2"):
        build(Recipe, {"kind": "visor-stage1", "out_dir": "x", "init": "y", "reducers": ["pooling:2x"]})
    with pytest.raises(ValueError, match="freeze_vision"):  # a reduced step gives the tower no gradient
        build(Recipe, {"kind": "base", "out_dir": "x", "reducers": ["pooling:2x"]})

    _, final = base_run
    stage1 = VisorForConditionalGeneration.from_llava_onevision(final)
    stage1.config.viable_configs = [[], [0]]
    stage1.save_pretrained(tmp_path / "stage1")
    import visor.compression.apply as apply

    seen, shortened = [], []  # per training forward: (reducer, target tokens); per reduction: (before, after) length
    forward, reduce_prompt = VisorForConditionalGeneration.forward, apply.apply_pre_llm

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if kwargs.get("labels") is not None:
            seen.append((kwargs.get("reducer"), out.num_loss_tokens))
        return out

    def spy_reduction(model, reducer, input_ids, *args, **kwargs):
        reduction = reduce_prompt(model, reducer, input_ids, *args, **kwargs)
        if args[2] is not None:  # (attention_mask, position_ids, labels, ...): a training forward, not validation
            shortened.append((input_ids.shape[1], reduction.input_ids.shape[1]))
        return reduction

    monkeypatch.setattr(VisorForConditionalGeneration, "forward", spy)
    monkeypatch.setattr(apply, "apply_pre_llm", spy_reduction)
    recipe = load_recipe(tiny_recipe(tmp_path, "tr", kind="visor-stage2", init=str(tmp_path / "stage1"), max_steps=8,
                                     save_every=8, tokenizer=str(final), freeze_vision=True, reducers=["none", "pooling:2x"]))
    out = Trainer(recipe, progress=False).train()
    before, after = stage1.state_dict(), VisorForConditionalGeneration.from_pretrained(out).state_dict()
    projector = [n for n in before if n.startswith(("multi_modal_projector.", "image_newline"))]
    assert projector and all(torch.equal(before[n], after[n]) for n in projector)  # no gradient reaches it: frozen
    assert any(not torch.equal(before[n], after[n]) for n in before if ".self_attn." in n)
    rows = [json.loads(line) for line in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert {r["reducer"] for r in rows} == {"none", "pooling:2x"}
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the validation also runs under each reducer trained on, at fewer FLOPs than the full token set
    evals = [json.loads(line)["eval"] for line in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(set(e["reduced"]) == {"pooling:2x"} for e in evals)
    assert all(e["reduced"]["pooling:2x"]["mean_flops"] < e["mean_flops"] for e in evals)
    assert [r["reducer"] for r in rows] == [sample_reducer(recipe, r["step"] - 1) or "none" for r in rows]
    assert {reducer for reducer, _ in seen} == {None, "pooling:2x"}
    assert all(tokens > 0 for _, tokens in seen)
    # every pooled micro-batch ran on a prompt with about half the visual placeholders (172 visual tokens here)
    assert len(shortened) == sum(reducer is not None for reducer, _ in seen)
    assert all(after <= before - 60 for before, after in shortened)


def test_base_run_with_reducers_trains_the_language_model_on_pooled_tokens(base_run, tmp_path):
    """A base recipe with ``reducers`` (the focus5 baseline: LLaVA-OV's language model also reads pooled tokens):
    pooled and full steps both run, only the language model changes (tower, projector and image newline fixed), the
    export is still a Hugging Face LLaVA-OV model, and its validation runs under each reducer."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor.train.loop import Trainer, sample_reducer

    _, init = base_run
    recipe = load_recipe(tiny_recipe(tmp_path, "pooled", init=str(init), freeze_vision=True, max_steps=8, save_every=8,
                                     eval_every=8, reducers=["none", "pooling:2x", "pooling:4x"],
                                     seed=1))  # seed 1 draws all three reducers within 8 steps
    final = Trainer(recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "pooled" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {r["reducer"] for r in steps} == {"none", "pooling:2x", "pooling:4x"}
    assert [r["reducer"] for r in steps] == [sample_reducer(recipe, r["step"] - 1) or "none" for r in steps]
    assert all(math.isfinite(r["loss"]) for r in steps)
    before = LlavaOnevisionForConditionalGeneration.from_pretrained(init).state_dict()
    after = LlavaOnevisionForConditionalGeneration.from_pretrained(final).state_dict()
    fixed = [n for n in before if ".vision_tower." in n or "multi_modal_projector." in n or "image_newline" in n]
    assert fixed and all(torch.equal(before[n], after[n]) for n in fixed)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".language_model." in n)
    last = [r["eval"] for r in rows if "eval" in r][-1]
    assert set(last["reduced"]) == {"pooling:2x", "pooling:4x"}
    assert last["reduced"]["pooling:4x"]["mean_flops"] < last["reduced"]["pooling:2x"]["mean_flops"] < last["mean_flops"]


# ---------------------------------------------------------------------- distributed
def test_torchrun_two_processes_match_one_and_fsdp_matches_ddp(tmp_path):
    optim = {"lr": 3e-3, "warmup_steps": 2, "vision_lr_scale": 0.5}  # the unfrozen tower in its own group
    single = tiny_recipe(tmp_path, "single", max_steps=3, save_every=3, optim=optim)
    run_cli([PYTHON, "-m", "visor", "train", str(single), "--no-progress"])
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    for port, mode in ((29531, "ddp"), (29532, "fsdp")):
        recipe = tiny_recipe(tmp_path, mode, max_steps=3, save_every=3, distributed=mode, optim=optim)
        run_cli(torchrun + [str(port), "-m", "visor", "train", str(recipe), "--no-progress", "--device", "cpu"])
    reference = final_weights(tmp_path / "single")
    for mode in ("ddp", "fsdp"):
        weights = final_weights(tmp_path / mode)
        assert set(weights) == set(reference)
        for name, tensor in reference.items():
            assert torch.allclose(weights[name], tensor, atol=2e-5, rtol=1e-4), f"{mode}: {name}"


def test_shape_head_under_ddp_matches_one_process(tmp_path):
    """The shape head runs inside the model's forward (a hook on the tower's encoder), so DDP reduces its gradients
    like any other parameter: two processes reach the one-process weights, head included."""
    extra = dict(max_steps=2, save_every=2, vision_shape_weight=0.5, model={**TINY_MODEL, "patch_size": 8})
    single = tiny_recipe(tmp_path, "single", **extra)
    run_cli([PYTHON, "-m", "visor", "train", str(single), "--no-progress"])
    ddp = tiny_recipe(tmp_path, "ddp", distributed="ddp", **extra)
    run_cli([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534", "-m", "visor",
             "train", str(ddp), "--no-progress", "--device", "cpu"])
    reference, weights = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert set(weights) == set(reference) and "aux_shape_head.proj.weight" in weights
    for name, tensor in reference.items():
        assert torch.allclose(weights[name], tensor, atol=2e-5, rtol=1e-4), name


# ---------------------------------------------------------------------- faults
CRASHING_RANK_SCRIPT = """
import sys
import visor.train.loop as loop
from visor.train.recipe import load_recipe

fetch = loop.micro_indices

def failing(recipe, step, accum_index, env):  # rank 0's data fails at the start of step 4 (0-based)
    if env.rank == 0 and step == 4:
        raise RuntimeError("injected data failure")
    return fetch(recipe, step, accum_index, env)

loop.micro_indices = failing
loop.Trainer(load_recipe(sys.argv[1]), progress=False).train()
"""


def test_an_error_on_one_rank_ends_a_distributed_run_instead_of_hanging(tmp_path):
    """Rank 0 fails between checkpoints while rank 1 waits in the next step's all-reduce: rank 0 saves its
    replicated DDP state alone (no barrier, which rank 1 would never reach) and exits with the error,
    and torchrun stops the run. Before, the closing save's barrier deadlocked both ranks for good."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RANK_SCRIPT)
    recipe = tiny_recipe(tmp_path, "crash", max_steps=8, save_every=3, distributed="ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                             str(script), str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "injected data failure" in result.stderr + result.stdout
    steps = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert steps[-1] == "step_00000004"  # steps 1-4 done, the 4th saved on the way out
    assert not (tmp_path / "crash" / "final").exists()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    straight = tiny_recipe(tmp_path, "straight", max_steps=8, save_every=2)
    run_cli([PYTHON, "-m", "visor", "train", str(straight), "--no-progress"])
    killed = tiny_recipe(tmp_path, "killed", max_steps=8, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([PYTHON, "-m", "visor", "train", str(killed), "--no-progress"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "killed" / "checkpoints" / "step_00000004").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    run_cli([PYTHON, "-m", "visor", "train", str(killed), "--no-progress", "--resume"])
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_is_skipped(tmp_path):
    messages = []

    def weights(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({"w": torch.arange(4.0)}, str(folder / "model.safetensors"))

    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, weights, {"step": step}, keep=5)
    newest = tmp_path / "checkpoints" / "step_00000003" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])  # truncated
    (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").unlink()  # interrupted write
    found = latest_checkpoint(tmp_path, log=messages.append)
    assert found.name == "step_00000001"
    assert any("step_00000003" in m and "bytes" in m for m in messages)
    assert any("step_00000002" in m and "COMPLETE" in m for m in messages)
    (tmp_path / "checkpoints" / ".tmp-step_00000004-1").mkdir()  # a half-written temp folder is ignored
    assert latest_checkpoint(tmp_path, log=messages.append).name == "step_00000001"


def test_real_model_recipes_start_on_a_tiny_stand_in(base_run, tmp_path):
    """The LLaVA-OV-0.5B stage recipes run on a tiny LLaVA-OV with LLaVA-format data (one step)."""
    from visor.data.synth.generate import write_split
    from visor.train.loop import Trainer

    _, final = base_run
    write_split(tmp_path / "data", "train", 8, families=["color", "code"])
    stage1 = load_recipe(ROOT / "recipes" / "visor-stage1-llava-ov-0.5b.yaml", [
        f"init={final}", f"out_dir={tmp_path / 's1'}", f"data.path={tmp_path / 'data' / 'train.jsonl'}",
        f"data.image_root={tmp_path / 'data'}", "global_batch=4", "micro_batch=2", "max_steps=1", "threads=1",
    ])
    assert Trainer(stage1, progress=False).train() is not None


def test_validation_items_follow_the_data_source(tmp_path):
    """The periodic evaluation's items come in the source's own form: procedural validation items, worded
    scenes, a LLaVA file's first records (none without ``val_path``), and worded scenes beside the images only
    when the run rehearses them; each made once per run."""
    from visor.data.synth.generate import write_split
    from visor.train.loop import SampleSource

    synth = SampleSource(load_recipe(tiny_recipe(tmp_path, "s")))
    items = synth.validation_items(3)
    assert [item.family for item in items] == ["color", "side", "color"] and synth.rehearsal_items(3) == []
    rehearsing = SampleSource(load_recipe(tiny_recipe(tmp_path, "r", micro_batch=2, data={"words_every": 2})))
    assert len(rehearsing.rehearsal_items(4)) == 4
    assert [(i.id, i.turns) for i in rehearsing.validation_items(3)] == [(i.id, i.turns) for i in items]  # no words
    worded = SampleSource(load_recipe(tiny_recipe(tmp_path, "w", freeze_vision=True,
                                                  data={"source": "words", "families": None})))
    assert all(not item.images for item in worded.validation_items(5) + rehearsing.rehearsal_items(4))
    assert {item.family for item in worded.validation_items(6)} == {f"words_{f}" for f in ("kind_color", "presence",
                                                                                         "doc", "chart", "recall", "copy")}

    write_split(tmp_path / "data", "train", 4, families=["color"])
    write_split(tmp_path / "data", "val", 5, families=["code"])
    llava = {"source": "llava", "path": str(tmp_path / "data" / "train.jsonl"), "image_root": str(tmp_path / "data"),
             "families": None}
    assert SampleSource(load_recipe(tiny_recipe(tmp_path, "l", data=llava))).validation_items(3) is None
    with_val = SampleSource(load_recipe(tiny_recipe(tmp_path, "v", data={**llava,
                                                                         "val_path": str(tmp_path / "data" / "val.jsonl")})))
    records = with_val.validation_items(3)
    assert len(records) == 3 and {r.family for r in records} == {"code"}
    (tmp_path / "data" / "val.jsonl").unlink()  # read once per run, not at every periodic evaluation
    assert with_val.validation_items(3) is records and rehearsing.rehearsal_items(4) is rehearsing.rehearsal_items(4)


# ---------------------------------------------------------------------- viable configurations
def test_nested_greedy_viable_set():
    from visor.train.configs import choose_viable

    # slot 2 helps most, then slot 0; slot 1 adds nothing
    gain = {0: 0.2, 1: 0.0, 2: 0.5}
    calls = []

    def scorer(config):
        calls.append(config)
        value = 0.2 + sum(gain[s] for s in config) / 2
        return {"easy_mean": value, "hard_mean": value, "mean_flops": 1.0 + len(config)}

    search = choose_viable(scorer, 3, "nested")
    assert search.slot_order == [2, 0, 1]
    assert search.viable == [(), (2,), (0, 2), (0, 1, 2)]
    assert len(calls) == 1 + 3 + 2 + 1 and len(set(calls)) == len(calls)
    exhaustive = choose_viable(scorer, 3, "exhaustive")
    assert exhaustive.viable == [(), (2,), (0, 2)]  # adding slot 1 never raises the score: not on the front


def test_configs_cli_writes_viable_set(base_run, tmp_path, capsys):
    from visor import VisorForConditionalGeneration
    from visor.cli.main import main

    _, final = base_run
    stage1 = VisorForConditionalGeneration.from_llava_onevision(final)
    stage1.save_pretrained(tmp_path / "s1")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(final) / name).exists():
            (tmp_path / "s1" / name).write_bytes((Path(final) / name).read_bytes())
    assert main(["configs", "--model", str(tmp_path / "s1"), "--n", "4", "--out", str(tmp_path / "s1v")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = VisorForConditionalGeneration.from_pretrained(tmp_path / "s1v")
    assert loaded.config.viable_configs == result["viable"] and len(result["viable"]) == loaded.plan.num_slots + 1
    assert list(loaded.plan.slot_order) == result["slot_order"]


def test_questions_per_image_adds_correct_turns_about_the_same_scene(tmp_path):
    """data.questions_per_image: extra question turns about the same scene, their answers read off the
    scene independently here, deterministic per index, every assistant turn a training target; a family
    whose scene holds one answer stays single-turn."""
    import re

    from transformers import LlavaOnevisionConfig

    from visor.data.batch import Batcher
    from visor.data.synth.families import other_queries
    from visor.data.tokenizer import build_tokenizer
    from visor.processing.processor import ImageGeometry
    from visor.train.loop import SampleSource
    from visor.train.models import image_processor_for

    recipe = load_recipe(tiny_recipe(tmp_path, "q", data={"families": ["doc", "chart", "presence", "code"],
                                                           "questions_per_image": 3}))
    source = SampleSource(recipe)
    seen = set()
    for index in range(12):
        item, turns = source.item(index), source.sample(index).turns
        assert turns[:2] == item.conversations()
        extra = 0 if item.family == "code" else min(2, len(other_queries(item.scene)))
        assert len(turns) == 2 + 2 * extra
        asked = [item.question] + [t["value"] for t in turns[2::2]]
        assert len(set(asked)) == len(asked)  # never the same question twice
        for human, gpt in zip(turns[2::2], turns[3::2]):
            assert human["from"] == "human" and gpt["from"] == "gpt" and "<image>" not in human["value"]
            pattern = {"doc": r"value of (.+)\?$", "chart": r"bar (\w+)\?$", "presence": r"there a (\w+) in"}[item.family]
            name = re.search(pattern, human["value"]).group(1)
            if item.family == "doc":  # the value printed after that key
                rows = dict(t["text"].split(": ") for t in item.scene["texts"] if t["role"] == "doc_row")
                assert gpt["value"] == rows[name]
            elif item.family == "chart":  # the value of the bar carrying that label
                assert gpt["value"] == str(next(b["value"] for b in item.scene["bars"] if b["label"] == name))
            else:  # presence: is a large shape of that kind drawn
                drawn = {sh["kind"] for sh in item.scene["shapes"] if sh["size"] >= item.scene["large_min"]}
                assert gpt["value"] == ("yes" if name in drawn else "no")
            seen.add(item.family)
        assert source.sample(index).turns == turns  # deterministic
    assert seen == {"doc", "chart", "presence"}
    single = SampleSource(load_recipe(tiny_recipe(tmp_path, "s", data={"families": ["doc"]})))
    assert len(single.sample(0).turns) == 2
    # every assistant turn is a training target
    tok = build_tokenizer()
    config = LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", "image_size": 64, "patch_size": 16},
                                  image_grid_pinpoints=[[64, 64]])
    doc = next(source.sample(i) for i in range(12) if source.item(i).family == "doc")
    batch = Batcher(tok, image_processor_for(config), ImageGeometry.from_config(config)).train_batch([doc])
    targets = tok.decode([t for t, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if label != -100])
    position = 0
    for answer in (t["value"] for t in doc.turns[1::2]):  # in order, each answer among the targets
        position = targets.index(answer, position) + len(answer)
    with pytest.raises(ValueError, match="questions_per_image"):
        build(Recipe, {"kind": "base", "out_dir": "x", "data": {"questions_per_image": 0}})


def test_unfrozen_vision_tower_trains_at_its_own_rate_and_resumes(tmp_path):
    """``optim.vision_lr_scale``: the tower's parameter group follows the schedule at a fixed fraction of
    the LLM's rate, through a resume; a frozen tower or a scale of 1 keeps one group."""
    from visor.train.loop import Trainer

    recipe = load_recipe(tiny_recipe(tmp_path, "vlr", freeze_vision=False, max_steps=4, save_every=2),
                         ["optim.vision_lr_scale=0.1"])
    trainer = Trainer(recipe, progress=False)
    trainer.train()
    rest, tower = trainer.optimizer.param_groups
    assert tower["lr"] == pytest.approx(0.1 * rest["lr"]) and rest["lr"] > 0
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].startswith("vision_tower.") for p in tower["params"])
    assert not any(names[id(p)].startswith("vision_tower.") for p in rest["params"])
    more = load_recipe(tiny_recipe(tmp_path, "vlr", freeze_vision=False, max_steps=6, save_every=2),
                       ["optim.vision_lr_scale=0.1"])
    resumed = Trainer(more, resume=True, progress=False)
    resumed.train()
    assert resumed.start_step == 4
    rest, tower = resumed.optimizer.param_groups
    assert tower["lr"] == pytest.approx(0.1 * rest["lr"])
    frozen = Trainer(load_recipe(tiny_recipe(tmp_path, "frozen", freeze_vision=True, max_steps=1),
                                 ["optim.vision_lr_scale=0.1"]), progress=False)
    frozen.build()
    assert len(frozen.optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="vision_lr_scale"):
        load_recipe(tiny_recipe(tmp_path, "bad"), ["optim.vision_lr_scale=0"])


def test_plain_training_warms_up_decays_and_fits():
    """visor.train.plain (the diagnostics' loop): linear warm-up, cosine to 0 at the last step, frozen parameters
    left out, a toy regression fitted."""
    from visor.train.plain import PlainTraining

    torch.manual_seed(0)
    layer, frozen = torch.nn.Linear(4, 1), torch.nn.Parameter(torch.ones(1), requires_grad=False)
    training = PlainTraining([*layer.parameters(), frozen], lr=0.1, steps=100, warmup=10)
    assert len(training.parameters) == 2
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.25
    rates = []
    for _ in range(100):
        rates.append(training.optimiser.param_groups[0]["lr"])
        training.step(((layer(x).squeeze(-1) - y) ** 2).mean())
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert training.optimiser.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert training.mean_loss(5) < 0.05 * training.losses[0] and torch.equal(frozen, torch.ones(1))


def test_resume_does_not_need_the_init_checkpoint_any_more(base_run, tmp_path):
    """A base run continuing a checkpoint that was since moved or pruned resumes from its own step checkpoint
    (a whole model folder), and reaches the weights of the same resume with its init in place."""
    import shutil

    from visor.train.loop import Trainer

    _, final = base_run
    init = tmp_path / "init"
    shutil.copytree(final, init)

    def recipe(name: str, steps: int):
        return load_recipe(tiny_recipe(tmp_path, name, init=str(init), max_steps=steps, save_every=2))

    for name in ("kept", "moved"):  # 4 steps, then resumed to 6 (the schedule of a 4-step run, as a resume has)
        Trainer(recipe(name, 4), progress=False).train()
    Trainer(recipe("kept", 6), resume=True, progress=False).train()
    shutil.rmtree(init)
    logs = []
    trainer = Trainer(recipe("moved", 6), resume=True, progress=False)
    trainer._log = logs.append
    trainer.train()
    assert any("is gone" in line for line in logs) and any("resumed from" in line for line in logs)
    kept, moved = final_weights(tmp_path / "kept"), final_weights(tmp_path / "moved")
    for name, value in kept.items():
        torch.testing.assert_close(moved[name], value, rtol=1e-5, atol=1e-6, msg=name)
