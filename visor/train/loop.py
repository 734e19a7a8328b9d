"""The training loop shared by every recipe kind.

Determinism (what makes resume and the 1-process == N-process tests hold):
* the sample at global index ``i`` is a pure function of ``i`` (procedural: ``generate_item(i)``; LLaVA
  files: record ``i mod n``); step ``s`` consumes indices ``[s*G, (s+1)*G)``; micro-batch ``a`` of rank
  ``r`` takes ``m`` consecutive indices at ``s*G + (a*W + r)*m``: the same G samples and the same
  micro-batch compositions whatever the number of processes;
* the loss is summed over target tokens and divided by the global batch's token count (all-reduced),
  so the gradient is the same for 1 process x k accumulation steps and k processes x 1;
* stage 2's active configuration at step ``s`` comes from ``Random((seed, s))``: the same on every rank
  and after a resume. A configuration may name a resolution (``visor.model.resolution``): the step's
  micro-batches are then laid out at that resolution (base-only: one crop, base grid + 1 newline); the step
  is read from the indices (``indices[0] // global_batch``), so the batch and the loss agree. With
  ``reducers`` (VISOR-TR, or a base run that also learns reduced tokens) a pre-LLM visual-token reducer is drawn
  per step the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.train.checkpoint import STATE_FILE, RunLock, latest_checkpoint, write_checkpoint
from visor.train.distributed import DistEnv, all_reduce_sum, barrier, cleanup, init_distributed, unwrap, wrap_model
from visor.train.lookup import crop_geometry
from visor.train.recipe import Recipe


# ---------------------------------------------------------------------- samples
def synth_config(recipe: Recipe):
    from visor.data.synth.config import DEFAULT_CONFIG

    return DEFAULT_CONFIG.with_image_size(recipe.data.synth_image_size)


class SampleSource:
    """Training samples by global index (module docstring)."""

    def __init__(self, recipe: Recipe, split: str = "train") -> None:
        self.recipe = recipe
        self.split = split
        self.records = None
        # the periodic evaluation's items, made (or read from data.val_path) once per run, not at every evaluation
        self._evaluation_items: dict[tuple[str, int], list | None] = {}
        if recipe.data.source == "llava":
            from visor.data.llava_format import load_llava

            self.records, report = load_llava(recipe.data.path, recipe.data.image_root)
            if not self.records:
                raise ValueError(f"no usable record in {recipe.data.path}: {report.summary()}")
        else:
            self.config = synth_config(recipe)

    def item(self, index: int):
        """The procedural item at ``index`` (a ``WordedItem`` with ``data.source=words``, and at every
        ``data.words_every``-th training index: worded scene ``index // words_every``, every worded family in turn)."""
        from visor.data.synth.generate import generate_item
        from visor.data.words import worded_item

        data = self.recipe.data
        weights = data.family_weights if self.split == "train" else None  # validation: every family in turn
        if data.source == "words":
            return worded_item(self.split, index, seed=data.seed, families=data.families, weights=weights,
                               config=self.config)
        if self.split == "train" and data.words_every and (index + 1) % data.words_every == 0:
            return worded_item(self.split, index // data.words_every, seed=data.seed, config=self.config)
        return generate_item(self.split, index, seed=data.seed, config=self.config, families=data.families,
                             weights=weights)

    def sample(self, index: int, item=None):
        """The training sample at ``index`` (``item``: its procedural item, when the caller has generated it)."""
        from visor.data.batch import Sample

        if self.records is not None:
            record = self.records[index % len(self.records)]
            return Sample(record.load_images(), record.conversations)
        from visor.data.words import WordedItem

        item = item if item is not None else self.item(index)
        if isinstance(item, WordedItem):
            return Sample([], item.conversations(self.recipe.data.questions_per_image))
        from visor.data.synth.families import derive_answer, question_text

        turns = item.conversations(self.recipe.data.question_first)
        for scene in self.turn_scenes(index, item)[1:]:
            turns += [{"from": "human", "value": question_text(scene)}, {"from": "gpt", "value": derive_answer(scene)}]
        return Sample([item.image], turns)

    def turn_scenes(self, index: int, item) -> list[dict]:
        """The scene of each question turn of the procedural sample at ``index``: the item's own, then up to
        ``questions_per_image - 1`` more questions about the same scene (``families.other_queries``), in a fixed order
        per index."""
        scenes = [item.scene]
        extra = self.recipe.data.questions_per_image - 1
        if extra > 0:
            import numpy as np

            from visor.data.synth.families import other_queries

            queries = other_queries(item.scene)
            order = np.random.default_rng([self.recipe.data.seed, index]).permutation(len(queries))
            scenes += [{**item.scene, "query": queries[int(q)]} for q in order[:extra]]
        return scenes

    def validation_items(self, count: int) -> list | None:
        """The periodic evaluation's items, in this source's form: ``count`` procedural validation items (worded
        scenes with ``data.source=words``), or the first ``count`` records of ``data.val_path`` for LLaVA data
        (``None`` without one). Made once per ``count``."""
        return self._made_once(("validation", count), lambda: self._make_validation_items(count))

    def _made_once(self, key: tuple[str, int], make):
        if key not in self._evaluation_items:
            self._evaluation_items[key] = make()
        return self._evaluation_items[key]

    def _make_validation_items(self, count: int) -> list | None:
        data = self.recipe.data
        if data.source == "llava":
            if not data.val_path:
                return None
            from visor.eval.harness import llava_items

            return llava_items(data.val_path, data.image_root)[0][:count]
        if data.source == "words":
            from visor.data.words import worded_eval_items

            return worded_eval_items("val", count, seed=data.seed, families=data.families, config=self.config)
        from visor.eval.harness import synth_items

        return synth_items("val", count, seed=data.seed, config=self.config, families=data.families,
                           question_first=data.question_first)

    def rehearsal_items(self, count: int) -> list:
        """``count`` worded validation scenes when the run rehearses them (``data.words_every``), else none: is
        the lookup a language pre-training taught still there? Made once per ``count``."""
        if not (self.recipe.data.source == "synth" and self.recipe.data.words_every):
            return []
        from visor.data.words import worded_eval_items

        return self._made_once(("rehearsal", count), lambda: worded_eval_items("val", count, seed=self.recipe.data.seed,
                                                                               config=self.config))


def micro_indices(recipe: Recipe, step: int, accum: int, env: DistEnv) -> list[int]:
    start = step * recipe.global_batch + (accum * env.world_size + env.rank) * recipe.micro_batch
    return list(range(start, start + recipe.micro_batch))


def sample_config(recipe: Recipe, viable: list[tuple[int, ...]], step: int) -> tuple[int, ...]:
    return random.Random(f"{recipe.seed}-{step}").choice(viable)


def sample_reducer(recipe: Recipe, step: int) -> str | None:
    """The step's visual-token reducer (``recipe.reducers``), ``None`` for the full token set. A draw of
    its own, a pure function of (seed, step) like the configuration's, so every process and a resumed run agree."""
    if not recipe.reducers:
        return None
    name = random.Random(f"{recipe.seed}-{step}-reducer").choice(recipe.reducers)
    return None if name == "none" else name


# ---------------------------------------------------------------------- tasks
class LanguageTask:
    """Next-token loss on assistant tokens (base, visor-stage1, visor-stage2)."""

    def __init__(self, recipe: Recipe, model, tokenizer, image_processor) -> None:
        from visor.data.batch import Batcher

        self.recipe = recipe
        self.source = SampleSource(recipe)
        self.batcher = Batcher.for_model(model, tokenizer, image_processor)
        from visor.model.resolution import Configuration, cross, parse_configuration

        plan = model.plan
        if recipe.kind == "visor-stage2":
            viable = recipe.viable_configs or model.config.viable_configs
            if not viable:
                raise ValueError("stage 2 needs viable configurations: run `visor configs` on the stage-1 checkpoint first")
            self.configurations = [parse_configuration(c, plan) for c in viable]
            resolutions = getattr(recipe, "resolutions", None)
            if resolutions:  # every viable SA set at every listed resolution
                sets = list(dict.fromkeys(c.active_sa for c in self.configurations))
                self.configurations = cross(sets, resolutions)
        else:
            self.configurations = [Configuration(plan.all_slots)]
        self.viable = [c.active_sa for c in self.configurations]
        # a base recipe with a shape weight trains a per-patch shape head on the tower (visor.train.auxiliary)
        self.shape_weight = recipe.vision_shape_weight if recipe.kind == "base" else 0.0
        # (base view size, patch size, anyres grid): how scene pixels map to crops and tokens, for both heads' targets
        self.crop_geometry = crop_geometry(model.config)
        self.shape_ce: list[float] = []  # the head's loss per micro-batch since the last metrics row
        # a base recipe with a lookup weight supervises where the answer attends (visor.train.lookup)
        self.lookup_weight = recipe.lookup_weight if recipe.kind == "base" else 0.0
        self.lookup = None
        if self.lookup_weight:
            from visor.train.lookup import LookupSupervision

            self.lookup = LookupSupervision(model.language_model, recipe.lookup_layers, recipe.lookup_heads)
        self.lookup_mass: list[float] = []  # mean attention mass on the targets per micro-batch since the last row
        # a base recipe with a mark weight asks the visual tokens to mark the named place (visor.train.marking)
        self.mark_weight = recipe.mark_weight if recipe.kind == "base" else 0.0
        self.mark_loss: list[float] = []  # the mark head's loss per micro-batch since the last metrics row
        self.mark_accuracy: list[float] = []  # and its balanced accuracy over the image tokens
        self.mark_choice: list[float] = []  # and whether the named place outscores the other candidates
        # and with a tag weight, which place each visual token belongs to (visor.train.marking)
        self.tag_weight = recipe.tag_weight if recipe.kind == "base" else 0.0
        self.tag_loss: list[float] = []
        self.tag_accuracy: list[float] = []  # on the tokens of a place
        if self.lookup_weight or self.mark_weight or self.tag_weight:
            self.image_token_id = model.config.image_token_id

    def configuration_for_step(self, step: int):
        """The step's ``Configuration`` (resolution + active SA slots); one draw per step (module docstring)."""
        configs = self.configurations
        return configs[0] if len(configs) == 1 else sample_config(self.recipe, configs, step)

    def config_for_step(self, step: int) -> tuple[int, ...]:
        return self.configuration_for_step(step).active_sa

    def batch(self, indices: list[int]) -> dict:
        if self.shape_weight or self.lookup_weight or self.mark_weight or self.tag_weight:
            items = [self.source.item(i) for i in indices]
            batch = self.batcher.train_batch([self.source.sample(i, item) for i, item in zip(indices, items)])
            if self.shape_weight:
                from visor.train.auxiliary import crop_shape_targets

                batch["shape_targets"] = torch.cat([crop_shape_targets(item, *self.crop_geometry) for item in items])
            if self.lookup_weight or self.mark_weight:
                from visor.train.lookup import batch_lookup_targets

                per_row = self._turn_targets(indices, items)
                if self.lookup_weight:
                    batch["lookup_targets"] = batch_lookup_targets(batch["input_ids"], batch["labels"],
                                                                   self.image_token_id, per_row)
                if self.mark_weight:  # the first turn only: its question is the one before the image
                    first = [[turns[0]] + [None] * (len(turns) - 1) for turns in per_row]
                    queries, targets = batch_lookup_targets(batch["input_ids"], batch["labels"], self.image_token_id,
                                                            first)
                    candidates = self._first_turn_candidates(indices, items, batch["input_ids"])
                    batch["mark_targets"] = (queries[:, 0], targets, [candidates[int(r)] for r in queries[:, 0]])
            if self.tag_weight:
                batch["tag_labels"] = self._tag_labels(items, batch["input_ids"])
            return batch
        samples = [self.source.sample(i) for i in indices]
        config = self.configuration_for_step(indices[0] // self.recipe.global_batch) if indices else None
        if config is None or config.tiled:
            return self.batcher.train_batch(samples)
        return self.batcher.train_batch(samples, resolution=config.resolution)

    def _tag_labels(self, items: list, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, N] per-token tags (``visor.train.marking.image_token_tags``) on each row's image tokens, -100 elsewhere."""
        from visor.train.lookup import on_image_tokens
        from visor.train.marking import image_token_tags

        return torch.stack([
            on_image_tokens(row, self.image_token_id,
                            image_token_tags(item.scene, self.crop_geometry, self.recipe.lookup_region), -100, "tags")
            for row, item in zip(input_ids, items)])

    def _first_turn_candidates(self, indices: list[int], items: list,
                               input_ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Per row, [C, N] masks of every place the first question could have named, the named one first
        (``visor.train.lookup.lookup_candidates``); ``None`` where it names fewer than two (presence)."""
        from visor.train.lookup import image_token_targets, lookup_candidates, on_image_tokens

        per_row = []
        for row, (index, item) in enumerate(zip(indices, items)):
            scene = self.source.turn_scenes(index, item)[0]
            places = lookup_candidates(scene, self.recipe.lookup_region)
            per_row.append(None if len(places) < 2 else torch.stack([
                on_image_tokens(input_ids[row], self.image_token_id,
                                image_token_targets(boxes, scene["size"], *self.crop_geometry))
                for boxes, _ in places]))
        return per_row

    def _turn_targets(self, indices: list[int], items: list) -> list[list[torch.Tensor | None]]:
        """Per row, per question turn: the image tokens of the place the question names (``None``: names none)."""
        from visor.train.lookup import image_token_targets, lookup_boxes

        per_row = []
        for index, item in zip(indices, items):
            per_turn = []
            for scene in self.source.turn_scenes(index, item):
                boxes = lookup_boxes(scene, self.recipe.lookup_region)
                per_turn.append(image_token_targets(boxes, scene["size"], *self.crop_geometry) if boxes else None)
            per_row.append(per_turn)
        return per_row

    @staticmethod
    def count(batch: dict) -> int:
        labels = batch["labels"]
        return int((labels[:, 1:] != -100).sum())

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, int]:
        # a pre-LLM reducer shortens the prompt's image placeholders only, so the target tokens (and their global
        # count) stay those of the batch; the reduced features carry no gradient into the projector
        reducer = sample_reducer(self.recipe, step)  # None unless the recipe names reducers (Recipe checks)
        extra = {"reducer": reducer} if reducer else {}
        batch = dict(batch)
        shape_targets = batch.pop("shape_targets", None)
        lookup_targets = batch.pop("lookup_targets", None)
        mark_targets = batch.pop("mark_targets", None)
        tag_labels = batch.pop("tag_labels", None)
        if lookup_targets is not None:
            self.lookup.arm(*lookup_targets, batch["attention_mask"])
        out = model(**batch, active_sa=self.config_for_step(step), loss_reduction="sum", **extra)
        loss = out.loss
        # auxiliary losses are weighted by the micro-batch's target tokens: divided by the global token count (the
        # loop), the step's objective is answer loss per token + weight x the token-weighted mean of each one
        if shape_targets is not None:
            from visor.train.auxiliary import shape_head_loss

            shape_ce = shape_head_loss(unwrap(model), shape_targets)
            self.shape_ce.append(float(shape_ce.detach()))
            loss = loss + self.shape_weight * shape_ce * out.num_loss_tokens
        if lookup_targets is not None:
            # None when no turn of the micro-batch names a place; q/k projections get gradients from the answer loss
            # anyway, so DDP sees the same parameters used either way
            taken = self.lookup.take()
            if taken is not None:
                lookup_loss, masses = taken
                self.lookup_mass.append(float(masses.mean()))
                loss = loss + self.lookup_weight * lookup_loss * out.num_loss_tokens
        if mark_targets is not None:
            from visor.train.marking import mark_loss

            rows, targets, candidates = mark_targets
            marked, accuracy, choice = mark_loss(unwrap(model), rows, targets,
                                                 batch["input_ids"] == self.image_token_id, candidates,
                                                 self.recipe.mark_choice_weight)
            if rows.numel():
                self.mark_loss.append(float(marked.detach()))
                self.mark_accuracy.append(accuracy)
            if choice == choice:  # not NaN: a marked row had candidates to choose among
                self.mark_choice.append(choice)
            loss = loss + self.mark_weight * marked * out.num_loss_tokens
        if tag_labels is not None:
            from visor.train.marking import tag_loss

            tagged, accuracy = tag_loss(unwrap(model), tag_labels)
            if accuracy == accuracy:  # not NaN: the micro-batch holds a tagged token
                self.tag_loss.append(float(tagged.detach()))
                self.tag_accuracy.append(accuracy)
            loss = loss + self.tag_weight * tagged * out.num_loss_tokens
        return loss, out.num_loss_tokens


class DenseVisionTask:
    """Dense per-patch pre-training of the vision tower on 64 px crops of procedural images."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.source = SampleSource(recipe)
        spec = recipe.model
        self.size, self.patch = spec.image_size, spec.patch_size

    def batch(self, indices: list[int]) -> dict:
        import numpy as np

        from visor.data.synth.dense import dense_targets
        from visor.train.models import SIGLIP_MEAN, SIGLIP_STD

        mean, std = np.asarray(SIGLIP_MEAN, np.float32), np.asarray(SIGLIP_STD, np.float32)

        pixels, targets = [], {"left": [], "right": [], "color": [], "dots": []}
        if self.recipe.vision_shape_weight > 0:
            targets["shape"] = []
        for index in indices:
            item = self.source.item(index)
            rng = np.random.default_rng(index)
            width, height = item.image.size
            if index % 4 == 0:  # a base view: the whole image downscaled (teaches colour/shape at a glance)
                image = item.image.resize((self.size, self.size))
                dense = dense_targets(item, self.patch, image_size=(self.size, self.size))
                box = None
            else:  # a native-resolution crop, as an anyres tile sees it; mostly around small print
                if item.glyphs and rng.random() < 0.8:
                    cx, cy = item.glyphs[int(rng.integers(len(item.glyphs)))].center
                    x = cx - self.size / 2 + rng.integers(-self.size // 4, self.size // 4 + 1)
                    y = cy - self.size / 2 + rng.integers(-self.size // 4, self.size // 4 + 1)
                else:
                    x, y = rng.integers(0, width - self.size + 1), rng.integers(0, height - self.size + 1)
                x = int(min(max(x, 0), width - self.size) // self.patch * self.patch)
                y = int(min(max(y, 0), height - self.size) // self.patch * self.patch)
                image = item.image.crop((x, y, x + self.size, y + self.size))
                dense = dense_targets(item, self.patch)
                box = (y // self.patch, x // self.patch)
            array = np.asarray(image, dtype=np.float32) / 255.0
            pixels.append(torch.from_numpy((array - mean) / std).permute(2, 0, 1))
            grid = self.size // self.patch
            for key in targets:
                values = getattr(dense, key)
                if box is not None:
                    values = values[box[0]:box[0] + grid, box[1]:box[1] + grid]
                elif key in ("left", "right", "dots"):
                    values = np.zeros_like(values)  # glyphs are unreadable in the base view: teach "none"
                targets[key].append(torch.from_numpy(np.ascontiguousarray(values)).flatten())
        batch = {"pixel_values": torch.stack(pixels)}
        batch.update({k: torch.stack(v) for k, v in targets.items()})
        return batch

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["left"].numel())

    @torch.no_grad()
    def evaluate(self, model, n: int = 256) -> dict:
        """Per-patch accuracy on validation crops: glyph halves that hold a glyph, empty halves, colour, and
        (with the shape head) the shape kind of patches inside a shape."""
        source, self.source = self.source, SampleSource(self.recipe, split="val")
        try:
            batch = self.batch(list(range(n)))
        finally:
            self.source = source
        out = model(batch["pixel_values"])
        hits = {"glyph": [0, 0], "none": [0, 0], "color": [0, 0]}
        for side in ("left", "right"):
            pred, target = out[side].argmax(-1), batch[side]
            for key, where in (("glyph", target > 0), ("none", target == 0)):
                hits[key][0] += int((pred == target)[where].sum())
                hits[key][1] += int(where.sum())
        hits["color"] = [int((out["color"].argmax(-1) == batch["color"]).sum()), batch["color"].numel()]
        if "shape" in out:
            inside = batch["shape"] > 0
            hits["shape"] = [int((out["shape"].argmax(-1) == batch["shape"])[inside].sum()), int(inside.sum())]
        return {f"{k}_acc": a / max(b, 1) for k, (a, b) in hits.items()}

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, int]:
        import torch.nn.functional as F

        out = model(batch["pixel_values"])
        ce = lambda logits, target: F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")  # noqa: E731
        dots = batch["dots"].clamp(max=unwrap(model).max_dots)
        total = ce(out["left"], batch["left"]) + ce(out["right"], batch["right"]) + ce(out["dots"], dots)
        total = total + self.recipe.vision_color_weight * ce(out["color"], batch["color"])
        if self.recipe.vision_shape_weight > 0:
            total = total + self.recipe.vision_shape_weight * ce(out["shape"], batch["shape"])
        return total, self.count(batch)


# ---------------------------------------------------------------------- run
def _param_groups(model, recipe: Recipe) -> list[dict]:
    """Trainable parameters; an LVLM's vision tower in its own group at ``lr x optim.vision_lr_scale``."""
    opt = recipe.optim
    tower, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (tower if "vision_tower." in name and recipe.kind != "vision" else rest).append(param)
    if opt.vision_lr_scale == 1.0 or not tower:  # one group, in the model's order (what checkpoints hold)
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return [{"params": rest}, {"params": tower, "lr": opt.lr * opt.vision_lr_scale}]


def _lr_lambda(recipe: Recipe):
    opt = recipe.optim

    def factor(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / max(opt.warmup_steps, 1)
        if opt.schedule == "constant":
            return 1.0
        progress = (step - opt.warmup_steps) / max(recipe.max_steps - opt.warmup_steps, 1)
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _autocast(recipe: Recipe, env: DistEnv):
    if recipe.precision == "bf16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _load_state(model, optimizer, weights: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


class Trainer:
    """Runs one recipe (``visor train``)."""

    def __init__(self, recipe: Recipe, resume: bool = False, device: str | None = None, progress: bool = True) -> None:
        self.recipe = recipe
        self.resume = resume
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        self.env = init_distributed(device)
        self.progress = progress and self.env.is_main
        self._settle_precision()
        self.run_dir = Path(recipe.out_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def _settle_precision(self) -> None:
        """Resolve ``precision: auto`` for this device, and say so when bf16 is asked of a CPU that emulates it."""
        from visor.precision import fast_bf16, resolve_precision

        asked = self.recipe.precision
        self.recipe.precision = resolve_precision(asked, self.env.device)
        if asked == "auto":
            self._log(f"precision auto -> {self.recipe.precision} on {self.env.device.type}")
        elif asked == "bf16" and self.env.device.type == "cpu" and not fast_bf16("cpu"):
            self._log("warning: bf16 autocast on a CPU without AMX is emulated and several times slower than fp32 "
                      "(visor.precision); pass precision=auto or precision=fp32 to train in fp32 here")

    # ------------------------------------------------------------ set-up
    def _tokenizer(self, recipe: Recipe):
        from visor.data.tokenizer import load_tokenizer

        source = recipe.tokenizer or recipe.init
        if source:
            return load_tokenizer(source)
        from visor.data.tokenizer import build_tokenizer

        return build_tokenizer()

    def build(self) -> None:
        """Build the model (wrapped for the recipe's distributed mode), the task, the optimiser and the scheduler,
        and resume from the run's last complete checkpoint when asked: everything a run needs before its first step.
        ``run`` calls it; diagnostics call it to get the recipe's model and batches without training."""
        from visor.train import models

        recipe = self.recipe
        if self.resume and recipe.kind in ("base", "visor-stage2") and recipe.init and not Path(recipe.init).exists():
            # a base or stage-2 step checkpoint is a whole model folder (config, tokenizer, processor), and its
            # weights replace init's anyway: a moved or pruned init must not block the resume
            checkpoint = latest_checkpoint(self.run_dir, log=self._log)
            if checkpoint is not None:
                self._log(f"init {recipe.init} is gone: building the model from {checkpoint}, which it resumes")
                recipe = dataclasses.replace(recipe, init=str(checkpoint))
        torch.manual_seed(recipe.seed)
        if recipe.kind == "vision":
            from visor.data.synth.dense import COLOR_CLASSES, GLYPH_CLASSES, SHAPE_CLASSES

            self.tokenizer = self.image_processor = None
            model = models.DenseVisionModel(recipe.model, len(GLYPH_CLASSES), len(COLOR_CLASSES),
                                            n_shapes=len(SHAPE_CLASSES) if recipe.vision_shape_weight > 0 else 0)
            self.task = DenseVisionTask(recipe)
        else:
            self.tokenizer = self._tokenizer(recipe)
            model = models.build_llava_base(recipe, self.tokenizer) if recipe.kind == "base" else models.build_visor(recipe)
            if recipe.kind == "base" and recipe.vision_shape_weight > 0:
                from visor.train.auxiliary import attach_shape_head

                attach_shape_head(model)
            if recipe.kind == "base" and (recipe.mark_weight > 0 or recipe.tag_weight > 0):
                from visor.train.marking import TAG_ATTRIBUTE, TAGS, attach_token_head

                if recipe.mark_weight > 0:
                    attach_token_head(model, recipe.mark_layer)
                if recipe.tag_weight > 0:
                    attach_token_head(model, recipe.tag_read_layer, TAG_ATTRIBUTE, len(TAGS) + 1)
            self.image_processor = models.image_processor_for(model.config)
            self.task = LanguageTask(recipe, model, self.tokenizer, self.image_processor)
        if recipe.grad_checkpointing and hasattr(model, "language_model"):
            model.language_model.gradient_checkpointing = True
        trainable = models.set_trainable(model, recipe)
        if not trainable:
            raise ValueError("the recipe leaves no parameter to train")
        model.to(self.env.device)
        self.model = wrap_model(model, recipe.distributed, self.env)
        opt = recipe.optim
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, recipe), lr=opt.lr,
                                           betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(recipe))
        self.start_step = 0
        if self.resume:
            self._resume()

    def _resume(self) -> None:
        from safetensors.torch import load_file

        checkpoint = latest_checkpoint(self.run_dir, log=self._log)
        if checkpoint is None:
            self._log(f"no complete checkpoint in {self.run_dir}: starting from scratch")
            return
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
        weights = load_file(str(checkpoint / "model.safetensors"))
        _load_state(self.model, self.optimizer, weights, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        self._log(f"resumed from {checkpoint} at step {self.start_step}")

    def _log(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message)

    def _metric(self, row: dict) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------ checkpoints
    def _may_save_after(self, crashed: bool) -> bool:
        """Whether this rank may write a checkpoint on its way out. After an error only this rank is leaving:
        the others wait in a collective of the next step, so a save that gathers (FSDP) or ends in a barrier
        would hang. A DDP rank 0 holds the full replicated state and saves alone; other ranks save nothing,
        and the run keeps its last periodic checkpoint (at most ``save_every`` steps lost)."""
        if not crashed or not self.env.enabled:
            return True
        return self.recipe.distributed == "ddp" and self.env.is_main

    def save(self, step: int, collective: bool = True) -> None:
        """Write the step checkpoint (rank 0 writes; ``collective=False`` skips the closing barrier)."""
        from safetensors.torch import save_file

        weights, optim_state = _full_state(self.model, self.optimizer)
        if self.env.is_main:
            state = {
                "step": step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "data_position": step * self.recipe.global_batch,
                "recipe": self.recipe.to_dict(),
            }

            def save_weights(folder: Path) -> None:
                # tied tensors share storage, which safetensors refuses: store independent copies
                save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
                config = getattr(unwrap(self.model), "config", None)
                if config is not None:
                    config.to_json_file(str(folder / "config.json"))
                # tokenizer + image processor too, so `visor eval --model CHECKPOINT` works mid-run
                for part in (self.tokenizer, self.image_processor):
                    if part is not None:
                        part.save_pretrained(str(folder))

            path = write_checkpoint(self.run_dir, step, save_weights, state, keep=self.recipe.keep_checkpoints)
            self._log(f"checkpoint {path}")
        if collective:
            barrier(self.env)

    # ------------------------------------------------------------ loop
    def train(self) -> Path | None:
        lock = RunLock(self.run_dir).acquire() if self.env.is_main else None
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> Path | None:
        recipe, env = self.recipe, self.env
        self.build()
        accum = recipe.accumulation_steps(env.world_size)
        stop = {"signal": None}

        def on_signal(signum, frame):  # finish the current step, save, exit
            stop["signal"] = signum

        previous = signal.signal(signal.SIGTERM, on_signal)
        bar = tqdm(total=recipe.max_steps, initial=self.start_step, desc=recipe.kind, disable=not self.progress)
        started = time.perf_counter()
        window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
        step = self.start_step
        last_saved = self.start_step
        crashed = False
        try:
            while step < recipe.max_steps:
                batches = [self.task.batch(micro_indices(recipe, step, a, env)) for a in range(accum)]
                local_tokens = sum(self.task.count(b) for b in batches)
                global_tokens = all_reduce_sum(local_tokens, env)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for a, batch in enumerate(batches):
                    batch = {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    sync = nullcontext()
                    if recipe.distributed == "ddp" and env.enabled and a < accum - 1:
                        sync = self.model.no_sync()
                    with sync, _autocast(recipe, env):
                        loss_sum, _ = self.task.loss(self.model, batch, step)
                        # DDP/FSDP average gradients over ranks: scale by world size to get sum / global tokens
                        loss = loss_sum * env.world_size / max(global_tokens, 1)
                    loss.backward()
                    step_loss += float(loss_sum.detach()) / max(global_tokens, 1)
                step_loss = all_reduce_sum(step_loss, env)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], recipe.optim.grad_clip
                )
                self.optimizer.step()
                self.scheduler.step()
                step += 1
                window_samples += recipe.global_batch
                window_tokens += int(global_tokens)
                bar.update(1)
                if step % recipe.log_every == 0 or step == recipe.max_steps:
                    seconds = time.perf_counter() - window_start
                    row = {"step": step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "samples_per_s": window_samples / seconds,
                           "target_tokens_per_s": window_tokens / seconds, "elapsed_s": time.perf_counter() - started}
                    if hasattr(self.task, "viable") and len(self.task.viable) > 1:
                        row["active_sa"] = list(self.task.config_for_step(step - 1))
                        if any(not c.tiled for c in self.task.configurations):
                            row["resolution"] = self.task.configuration_for_step(step - 1).resolution
                    if recipe.reducers:
                        row["reducer"] = sample_reducer(recipe, step - 1) or "none"
                    # the auxiliary losses' metrics, per micro-batch of this rank since the last row, averaged
                    for attribute, key in (("shape_ce", "shape_head_ce"), ("lookup_mass", "lookup_mass"),
                                           ("mark_loss", "mark_loss"), ("mark_accuracy", "mark_accuracy"),
                                           ("mark_choice", "mark_choice"), ("tag_loss", "tag_loss"),
                                           ("tag_accuracy", "tag_accuracy")):
                        values = getattr(self.task, attribute, None)
                        if values:
                            row[key] = sum(values) / len(values)
                            values.clear()
                    self._metric(row)
                    bar.set_postfix(loss=f"{step_loss:.3f}", samples_s=f"{row['samples_per_s']:.1f}",
                                    tokens_s=f"{row['target_tokens_per_s']:.0f}")
                    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                if step % recipe.save_every == 0:
                    self.save(step)
                    last_saved = step
                if recipe.eval_every and step % recipe.eval_every == 0:
                    self.evaluate(step)
                timed_out = recipe.max_minutes is not None and (time.perf_counter() - started) / 60 >= recipe.max_minutes
                if stop["signal"] is not None or timed_out:
                    self._log(f"stopping at step {step} ({'signal' if stop['signal'] else 'time limit'})")
                    break
        except KeyboardInterrupt:
            self._log(f"interrupted at step {step}")
        except BaseException:
            crashed = True
            raise
        finally:
            bar.close()
            if step > last_saved and self._may_save_after(crashed):
                self.save(step, collective=not crashed)
            signal.signal(signal.SIGTERM, previous)
        final = None
        if step >= recipe.max_steps or (recipe.max_minutes is not None and stop["signal"] is None):
            if not (recipe.eval_every and step % recipe.eval_every == 0):
                self.evaluate(step)
            final = self.finish(step)
        cleanup(env)
        return final

    # ------------------------------------------------------------ end of run
    def evaluate(self, step: int, n: int | None = None) -> dict | None:
        """Greedy evaluation on the validation split (rank 0; skipped under FSDP, where weights are sharded)."""
        if self.env.enabled and self.recipe.distributed == "fsdp":
            return None
        summary = None
        if self.env.is_main and self.recipe.kind == "vision":
            model = unwrap(self.model)
            with _autocast(self.recipe, self.env):
                summary = self.task.evaluate(model.eval())
            model.train()
            self._metric({"step": step, "eval": summary})
            self._log(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
        elif self.env.is_main:
            from visor.eval.harness import evaluate

            model = unwrap(self.model)
            data = self.recipe.data
            items = self.task.source.validation_items(n or data.val_n)
            if items is None:
                barrier(self.env)
                return None
            from visor.eval.likelihood import answer_nll_by_family

            with _autocast(self.recipe, self.env):
                result = evaluate(model, self.tokenizer, self.image_processor, items, progress=False)
                # the answer loss moves long before exact match leaves chance (docs/training-log.md)
                summary = {**result.summary, **answer_nll_by_family(model, self.task.batcher, items)}
                # a VISOR-TR run: the same items under each reducer it trains on, what the run is for
                reduced = self.recipe.active_reducers
                if reduced:
                    summary["reduced"] = {}
                    for name in reduced:
                        scores = evaluate(model, self.tokenizer, self.image_processor, items, progress=False,
                                          generate_kwargs={"reducer": name}).summary
                        summary["reduced"][name] = {k: scores[k] for k in ("easy_mean", "hard_mean", "mean_flops")}
                worded = self.task.source.rehearsal_items(n or data.val_n)
                if worded:
                    scores = evaluate(model, self.tokenizer, self.image_processor, worded, progress=False).summary
                    summary["words"] = {"per_family": scores["per_family"], "mean": scores["overall_mean"]}
            model.train()
            self._metric({"step": step, "eval": summary})
            nll = "".join(f", {kind} answer loss {summary[f'{kind}_answer_nll']:.3f}" for kind in ("easy", "hard")
                          if f"{kind}_answer_nll" in summary)
            tr = "".join(f"; {name}: easy {r['easy_mean']}, hard {r['hard_mean']}" for name, r in summary.get("reduced", {}).items())
            words = f"; words mean {summary['words']['mean']:.3f}" if "words" in summary else ""
            if data.source == "words":  # no image family: the worded families' means instead of easy and hard
                per_family = ", ".join(f"{f} {v:.3f}" for f, v in summary["per_family"].items())
                self._log(f"step {step}: mean {summary['overall_mean']:.3f} ({per_family})")
            else:
                self._log(f"step {step}: easy {summary['easy_mean']}, hard {summary['hard_mean']}{nll}{tr}{words}")
        if self.env.is_main and summary is not None:  # the curve so far, to look at while a long run goes on
            plot_metrics(self.metrics_path, self.run_dir / "loss.png")
        barrier(self.env)
        return summary

    def finish(self, step: int) -> Path | None:
        """Export the trained model to RUN/final and plot the loss curve."""
        from visor.train import models

        final = self.run_dir / "final"
        weights, _ = _full_state(self.model, self.optimizer)
        if self.env.is_main:
            final.mkdir(parents=True, exist_ok=True)
            model = unwrap(self.model)
            if self.recipe.distributed == "fsdp" and self.env.enabled:
                model = None  # sharded: rebuild a plain copy from the gathered weights below
            if self.recipe.kind == "vision":
                tower = (model or unwrap(self.model)).tower
                tower.save_pretrained(str(final))
            else:
                if model is None:
                    model = self._plain_copy(weights)
                if self.recipe.kind == "base":
                    models.export_llava_onevision(model, final, self.tokenizer, self.image_processor)
                else:
                    model.save_pretrained(str(final))
                    self.tokenizer.save_pretrained(str(final))
                    self.image_processor.save_pretrained(str(final))
            (final / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2))
            plot_metrics(self.metrics_path, self.run_dir / "loss.png")
            self._log(f"saved {final}")
        barrier(self.env)
        return final

    def _plain_copy(self, weights: dict):
        from visor.model.modeling import VisorForConditionalGeneration

        config = unwrap(self.model).config
        from visor.train.auxiliary import drop_auxiliary

        model = VisorForConditionalGeneration(config)
        model.load_state_dict(drop_auxiliary(weights))
        return model


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """Loss curve (and validation easy/hard means where present) as a PNG."""
    from visor.data.synth.config import EASY_FAMILIES, TRAINING_FAMILIES
    from visor.plotting import pyplot

    plt = pyplot()

    if not Path(metrics_path).exists():
        return
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    # a resumed run logs again the steps since its checkpoint: the later row of a step is the one that counts
    train = sorted({r["step"]: r for r in rows if "loss" in r}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in rows if "eval" in r}.values(), key=lambda r: r["step"])
    nll_evals = [r for r in evals if r["eval"].get("answer_nll")]
    panels = 1 + bool(evals) + bool(nll_evals)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lookup = [r for r in train if "lookup_mass" in r]
    marks = [r for r in train if "mark_accuracy" in r]
    tags = [r for r in train if "tag_accuracy" in r]
    if lookup or marks or tags:  # supervised lookup, marking and tagging (visor.train.lookup, .marking), in percent
        twin = ax.twinx()
        if lookup:  # the attention mass on the place the question names
            twin.plot([r["step"] for r in lookup], [100 * r["lookup_mass"] for r in lookup], color="tab:orange",
                      label="attention on the named place")
        if marks:  # the mark head's balanced accuracy over the image tokens (50: a constant guess)
            twin.plot([r["step"] for r in marks], [100 * r["mark_accuracy"] for r in marks], color="tab:green",
                      label="marking, balanced accuracy")
        choices = [r for r in train if "mark_choice" in r]
        if choices:  # does the named place outscore the other rows, bars or shapes (chance 1 / candidates)
            twin.plot([r["step"] for r in choices], [100 * r["mark_choice"] for r in choices], color="tab:olive",
                      label="marking, named place chosen")
        if tags:  # the tag head's accuracy on the tokens of a place
            twin.plot([r["step"] for r in tags], [100 * r["tag_accuracy"] for r in tags], color="tab:purple",
                      label="tags of the places' tokens")
        twin.set_ylabel("%")
        twin.legend(loc="upper right", fontsize="small")
    if evals:
        ax = axes[0][1]
        keys = [k for k, v in evals[-1]["eval"].items() if isinstance(v, float) and k.endswith(("_mean", "_acc"))]
        for key in keys:
            ax.plot([r["step"] for r in evals], [100 * (r["eval"].get(key) or 0) for r in evals], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    if nll_evals:  # per family: which families are being learned while exact match still sits at chance
        ax = axes[0][2]
        families = sorted({f for r in nll_evals for f in r["eval"]["answer_nll"]})
        for family in families:
            points = [(r["step"], r["eval"]["answer_nll"][family]) for r in nll_evals if family in r["eval"]["answer_nll"]]
            easy = family in EASY_FAMILIES or family in TRAINING_FAMILIES  # dashed: large content
            ax.plot(*zip(*points), marker=".", label=family, linestyle="--" if easy else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("validation answer loss per token")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
