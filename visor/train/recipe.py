"""Training recipes: typed, validated dataclasses loaded from YAML with ``a.b=c`` overrides.

A recipe is the saved argument list of one run (as in litgpt / lingua): ``visor train RECIPE.yaml
optim.lr=3e-4 max_steps=100``. Unknown keys, wrong types and impossible combinations are rejected
with a message naming the field, before any model is built.

Kinds:
* ``vision``        dense per-patch pre-training of a tiny SigLIP tower (saved as a SigLIP checkpoint);
* ``base``          a LLaVA-OneVision model trained from scratch or continued (saved in HF LLaVA-OV format);
* ``visor-stage1``  convert a LLaVA-OV checkpoint to VISOR (maximal plan), train only the new blocks;
* ``visor-stage2``  fine-tune everything, one active configuration sampled per step (universal model).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

KINDS = ("vision", "base", "visor-stage1", "visor-stage2")


@dataclass
class TinyModelSpec:
    """Geometry of a LLaVA-OV model built from scratch (``base`` / ``vision`` kinds)."""

    image_size: int = 64  # the base view (SigLIP input) in pixels
    patch_size: int = 8
    max_tiles_per_side: int = 3  # grid pinpoints: multiples of image_size up to this many per side
    max_views: int = 9  # anyres_max_K
    vision_layers: int = 3
    vision_hidden: int = 192
    vision_heads: int = 3
    vision_mlp: int = 768
    text_layers: int = 9
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 704
    tie_word_embeddings: bool = True


@dataclass
class DataSpec:
    """Where training and validation samples come from."""

    # synth: procedural images; llava: a LLaVA JSON/JSONL file; words: the keyed families stated in text, no image
    # (visor.data.words, a base recipe's language pre-training)
    source: Literal["synth", "llava", "words"] = "synth"
    path: str | None = None  # LLaVA JSON/JSONL (source=llava)
    image_root: str | None = None
    val_path: str | None = None
    families: list[str] | None = None  # synth / words: subset of families (default all)
    # synth training: family -> positive int, a family of weight w drawn w times per cycle of sum(weights) items
    # (unnamed families weigh 1; validation stays one item per family in turn, so its means stay comparable)
    family_weights: dict[str, int] | None = None
    synth_image_size: int | None = None  # synth: override SynthConfig.image_size
    seed: int = 0  # synth: dataset seed (splits derive disjoint seeds from it)
    val_n: int = 200  # validation items evaluated periodically
    questions_per_image: int = 1  # synth / words training: up to this many question turns per image or worded scene
    # synth: the first question before the image instead of after it (SynthItem.conversations), in training and in
    # the periodic validation; evaluate such a model with `visor eval --question-first`
    question_first: bool = False
    workers: int = 1  # background processes generating/processing samples
    # base, synth training: every n-th sample (index % n == n - 1) is a worded scene instead (visor.data.words, every
    # worded family in turn, its questions capped by questions_per_image), rehearsing a language pre-training's
    # lookup while the images train: 300 image steps alone undid most of it (docs/training-log.md); 0 = never
    words_every: int = 0


@dataclass
class OptimSpec:
    lr: float = 1e-3
    weight_decay: float = 0.0  # the paper: AdamW without weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # an unfrozen vision tower of an LVLM trains at lr x this (LLaVA-OneVision trains its SigLIP at a fifth
    # of the LLM's rate); the schedule applies to both
    vision_lr_scale: float = 1.0


@dataclass
class Recipe:
    """One training run."""

    kind: Literal["vision", "base", "visor-stage1", "visor-stage2"]
    out_dir: str
    init: str | None = None  # checkpoint to start from (base: LLaVA-OV to continue; stage1: LLaVA-OV; stage2: stage-1 VISOR)
    # base from scratch: a pre-trained SigLIP checkpoint (from a ``vision`` run), or a LLaVA-OV one whose tower to take
    vision_init: str | None = None
    tokenizer: str | None = None  # folder with a HF tokenizer; default: init's, else the benchmark tokenizer
    model: TinyModelSpec = field(default_factory=TinyModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    global_batch: int = 32
    micro_batch: int = 8
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and save) after this wall time
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 10
    # auto: bf16 autocast where it runs natively (a GPU, a CPU with AMX), fp32 elsewhere (visor.precision); the run's
    # recipe.json records what ran
    precision: Literal["auto", "bf16", "fp32"] = "bf16"
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    grad_checkpointing: bool = False
    threads: int | None = None  # torch intra-op threads per process (1 is fastest on a busy 2-core machine)
    freeze_vision: bool = False  # base: keep the (pre-trained) vision tower fixed
    seed: int = 0
    # VISOR stages
    plan: Literal["default"] = "default"
    # stage 2: default = read from the init checkpoint; an entry may name a resolution,
    # {"resolution": "base", "active_sa": [...]} (visor.model.resolution); a plain list is full resolution
    viable_configs: list[list[int] | dict] | None = None
    config_sampling: Literal["uniform"] = "uniform"  # stage 2: one viable configuration per step, uniformly
    # stage 2: cross the viable SA sets with these resolutions ("full", "base"); None = as the entries say
    resolutions: list[str] | None = None
    # base or stage 2 (VISOR-TR): one visual-token reducer drawn per step beside the configuration, "NAME[:AMOUNT]" of
    # a pre-LLM reducer (visor.compression) or "none" for the full token set (a name listed twice is drawn twice as
    # often); None = never reduce. Needs a frozen tower; the projector and image-newline embedding stay fixed too.
    reducers: list[str] | None = None
    # vision kind
    vision_color_weight: float = 0.3
    # vision: > 0 adds a per-patch shape-kind head (visor.data.synth.dense); base: the same head on the LVLM's tower,
    # its loss added to the answer loss with this weight (visor.train.auxiliary; synth data, tower trained)
    vision_shape_weight: float = 0.0
    # base, synth data: > 0 adds a loss on where the answer attends in the keyed families (visor.train.lookup): the
    # ``lookup_heads`` of the ``lookup_layers`` are asked to attend to the place the question names
    lookup_weight: float = 0.0
    lookup_layers: list[int] = field(default_factory=lambda: [4])
    lookup_heads: int | list[int] = 1  # a count (the first heads of each layer) or head indices (those of each layer)
    lookup_region: str = "place"  # "place": the whole named row / column / shape; "answer": the answer's glyphs only
    # base, synth data, question first: > 0 adds a per-token head on the input of ``mark_layer`` that asks the visual
    # tokens to mark the place the first question names (visor.train.marking; the region is ``lookup_region``)
    mark_weight: float = 0.0
    mark_layer: int = 4
    # with marking: > 0 adds a cross-entropy among the places the question could have named, scored by the head's mean
    # logit over each (visor.train.marking.choice_loss): the balanced BCE alone is met by marking every place
    mark_choice_weight: float = 0.0
    # base, synth data: > 0 adds a per-token head on the input of ``tag_layer`` (None: ``mark_layer``) that asks every
    # visual token which place it belongs to, by the word a question names it with (visor.train.marking: tagging;
    # any prompt order). With marking too, a tag layer below the mark layer leaves layers to match tag and question
    tag_weight: float = 0.0
    tag_layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"recipe kind must be one of {KINDS}, got {self.kind!r}")
        if self.global_batch <= 0 or self.micro_batch <= 0:
            raise ValueError("global_batch and micro_batch must be positive")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.resolutions is not None:
            from visor.model.resolution import RESOLUTIONS

            bad = [r for r in self.resolutions if r not in RESOLUTIONS]
            if bad or not self.resolutions:
                raise ValueError(f"resolutions must be a non-empty list of {list(RESOLUTIONS)}, got {self.resolutions}")
        if self.reducers is not None:
            self._check_reducers()
        if self.kind in ("visor-stage1", "visor-stage2") and not self.init:
            raise ValueError(f"a {self.kind} recipe needs `init` (the checkpoint to start from)")
        if self.data.source == "llava" and not self.data.path:
            raise ValueError("data.source=llava needs data.path (a LLaVA JSON/JSONL file)")
        if self.optim.vision_lr_scale <= 0:
            raise ValueError(f"optim.vision_lr_scale must be positive (freeze_vision freezes), got {self.optim.vision_lr_scale}")
        if self.save_every <= 0:
            raise ValueError("save_every must be positive")
        if self.vision_color_weight < 0 or self.vision_shape_weight < 0:
            raise ValueError("vision_color_weight and vision_shape_weight must be >= 0")
        if self.vision_shape_weight > 0 and self.kind not in ("vision", "base"):
            raise ValueError(f"vision_shape_weight trains a shape head on the tower in vision and base recipes, not in "
                             f"a {self.kind} recipe")
        if self.vision_shape_weight > 0 and self.kind == "base" and (self.data.source != "synth" or self.freeze_vision):
            raise ValueError("vision_shape_weight in a base recipe needs procedural data (data.source=synth, whose "
                             "scenes give the labels) and a tower that trains (freeze_vision: false)")
        if self.lookup_weight < 0:
            raise ValueError(f"lookup_weight must be >= 0, got {self.lookup_weight}")
        from visor.train.lookup import REGIONS

        if self.lookup_region not in REGIONS:
            raise ValueError(f"lookup_region must be one of {REGIONS}, got {self.lookup_region!r}")
        if self.mark_weight < 0 or self.tag_weight < 0:
            raise ValueError(f"mark_weight and tag_weight must be >= 0, got {self.mark_weight}, {self.tag_weight}")
        if self.mark_choice_weight < 0 or (self.mark_choice_weight > 0 and self.mark_weight <= 0):
            raise ValueError(f"mark_choice_weight must be >= 0 and needs mark_weight > 0, got {self.mark_choice_weight} "
                             f"with mark_weight {self.mark_weight}")
        if self.mark_weight > 0 and not self.data.question_first:
            raise ValueError("mark_weight asks the visual tokens to mark the place the question names: they see the "
                             "question only with data.question_first: true")
        if self.lookup_weight > 0 or self.mark_weight > 0 or self.tag_weight > 0:
            if self.kind != "base" or self.data.source != "synth":
                raise ValueError("lookup_weight, mark_weight and tag_weight supervise a base model with the places "
                                 "procedural "
                                 f"scenes name: only in a base recipe on synth data, not a {self.kind} recipe on "
                                 f"{self.data.source} data")
            if self.active_reducers:
                raise ValueError("lookup_weight, mark_weight and tag_weight need every visual token in place (their "
                                 "targets are patches): no "
                                 f"reducers other than 'none', got {self.reducers}")
        if self.data.source == "words":
            from visor.data.words import worded_cycle

            if self.kind != "base":
                raise ValueError(f"data.source=words pre-trains a base model's language model, not a {self.kind} recipe")
            if not self.freeze_vision:
                raise ValueError("data.source=words holds no image: the tower would get no gradient; set "
                                 "freeze_vision: true")
            if self.active_reducers:
                raise ValueError(f"data.source=words holds no image to reduce: no reducers, got {self.reducers}")
            worded_cycle(self.data.families, self.data.family_weights)  # raises on unknown names, bad weights
        if self.data.words_every:
            if self.data.words_every < 2 or self.data.source != "synth" or self.kind != "base":
                raise ValueError("data.words_every mixes worded scenes into a base recipe's procedural images: >= 2, "
                                 f"with data.source=synth and kind base, got {self.data.words_every} with "
                                 f"{self.data.source} data in a {self.kind} recipe")
            if self.micro_batch < 2:  # then every micro-batch holds an image, and DDP sees the projector's gradient
                raise ValueError("data.words_every needs micro_batch >= 2 (a micro-batch of worded scenes alone would "
                                 "give the projector no gradient)")
            image_losses = [name for name, weight in self.image_loss_weights.items() if weight]
            if image_losses or self.active_reducers:
                raise ValueError("data.words_every puts text-only scenes in the batch: no auxiliary image loss and no "
                                 f"reducers, got {', '.join(image_losses) or 'none'} and {self.reducers}")
        if self.data.family_weights and self.data.source != "words":
            if self.data.source != "synth":
                raise ValueError("data.family_weights weighs procedural families: only with data.source=synth or words")
            from visor.data.synth.generate import family_cycle

            family_cycle(self.data.families, self.data.family_weights)  # raises on unknown names, bad weights
        if self.data.question_first and self.data.source != "synth":
            raise ValueError("data.question_first orders procedural prompts: only with data.source=synth (a LLaVA "
                             "file brings its own turns)")
        if self.data.questions_per_image < 1 or (self.data.questions_per_image > 1 and self.data.source == "llava"):
            raise ValueError("data.questions_per_image must be >= 1, and above 1 only with synth or words data (a LLaVA "
                             f"file brings its own turns), got {self.data.questions_per_image}")

    def _check_reducers(self) -> None:
        from visor.compression.registry import build_reducer

        if self.kind not in ("base", "visor-stage2") or not self.reducers:
            raise ValueError(f"reducers is a non-empty list for a base or visor-stage2 recipe, got {self.reducers!r} "
                             f"in a {self.kind} recipe")
        if not self.freeze_vision:
            # a reduced step computes the visual features without gradient (visor.compression.apply), so a tower that
            # trains would get gradients on some steps only, which DDP and the shape head cannot take
            raise ValueError("reducers need freeze_vision: true (reduced steps give the tower no gradient)")
        for name in self.reducers:
            if name == "none":
                continue
            reducer = build_reducer(name)  # raises on an unknown name or amount
            if reducer.stage != "pre_llm":
                raise ValueError(f"reducers: {name!r} prunes inside the LLM; training takes pre-LLM reducers "
                                 "(pooling, VisionZip, VisPruner, HiRED), which shorten the prompt before it")

    @property
    def active_reducers(self) -> list[str]:
        """The reducers a step can draw that shorten the visual tokens (``reducers`` without ``"none"``)."""
        return [r for r in self.reducers or [] if r != "none"]

    @property
    def image_loss_weights(self) -> dict[str, float]:
        """The auxiliary losses on the image's tokens added to the answer loss, by recipe field."""
        return {"vision_shape_weight": self.vision_shape_weight, "lookup_weight": self.lookup_weight,
                "mark_weight": self.mark_weight, "tag_weight": self.tag_weight}

    @property
    def tag_read_layer(self) -> int:
        """The decoder layer whose input the tag head reads: ``tag_layer``, or ``mark_layer`` when it is unset."""
        return self.mark_layer if self.tag_layer is None else self.tag_layer

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch x world size = {per_step}"
            )
        return self.global_batch // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- typed construction
def _check(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check(value, option, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}: {value!r} does not match {annotation}")
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected null, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {_check(k, args[0], f"{where} key"): _check(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    if annotation is float:
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data: Any, where: str = "recipe"):
    """Construct dataclass ``cls`` from a mapping, checking every field's type; unknown keys are errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {name: _check(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested mapping."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
            value = float(raw)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, overrides or [])
    return build(Recipe, data, where=path.name)
