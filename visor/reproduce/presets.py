"""What ``visor reproduce`` runs: the ``full`` preset (``--train``: the repository's tiny recipes, hours on
a CPU) and the ``quick`` preset (``--quick``: every stage on a minute-scale model, numbers meaningless).

A preset is the recipes of the training stages (``recipes/*.yaml`` for ``full``) plus the settings of the
stages between and after them (``tr``, optional: VISOR-TR, the routed universal model fine-tuned on reduced
tokens, which the VISOR-TR rows then run). ``focus`` to ``focus4`` are optional: base runs that continue the
previous one under their own recipe (e.g. a mix weighted towards the hard families); the last one a preset has is
the baseline that VISOR is built from and compared with. ``stage2b`` is optional too: stage 2 continued under its own
recipe (more steps on fresh items); when a preset has it, its output is the universal model. A preset can instead be given its baseline
(:meth:`Preset.with_baseline`, ``visor reproduce --train --baseline DIR``): a LLaVA-OneVision checkpoint that
``visor train`` wrote, whose base stages are then not run; and its universal VISOR model too
(:meth:`Preset.with_universal`, ``--universal DIR``: a stage-2 run, e.g. a shipped one trained further), whose
stage 1, configuration search and stage 2 are then not run either. Paths inside the recipes (``out_dir``, ``init``, ``vision_init``,
``tokenizer``) are filled in by the pipeline, which owns the work directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: training stages, in order, with the recipe kind each one runs
TRAINING_STAGES = {"vision": "vision", "base": "base", "focus": "base", "focus2": "base", "focus3": "base",
                   "focus4": "base", "stage1": "visor-stage1", "stage2": "visor-stage2", "stage2b": "visor-stage2",
                   "tr": "visor-stage2"}
#: the base runs in order: each optional one continues the previous one; the last a preset has is the baseline
BASELINE_STAGES = ("base", "focus", "focus2", "focus3", "focus4")
#: the recipe name of a given baseline (``Preset.with_baseline``); its ancestors' recipes follow as
#: ``baseline-init-1``, ``baseline-init-2``, ... (``baseline_provenance``)
GIVEN_BASELINE = "baseline"
#: the recipe name of a given universal VISOR model (``Preset.with_universal``); its ancestors' recipes follow as
#: ``universal-init-1``, ... (``universal_provenance``)
GIVEN_UNIVERSAL = "universal"
#: the stages a given universal model replaces (the configuration search between them is skipped as well)
UNIVERSAL_STAGES = ("stage1", "stage2", "stage2b")
#: recipe files of the full preset (under ``recipes/``)
FULL_RECIPES = {"vision": "vision-tiny.yaml", "base": "base-tiny.yaml", "focus": "base-tiny-focus.yaml",
                "focus2": "base-tiny-focus2.yaml", "focus3": "base-tiny-focus3.yaml",
                "focus4": "base-tiny-focus4.yaml", "stage1": "visor-stage1-tiny.yaml", "stage2": "visor-stage2-tiny.yaml",
                "stage2b": "visor-stage2-continue-tiny.yaml",
                "tr": "visor-tr-tiny.yaml"}
#: recipe fields that are paths or logging knobs: not part of a stage's cache key
PATH_FIELDS = ("out_dir", "init", "vision_init", "tokenizer")
NON_RESULT_FIELDS = ("log_every", "save_every", "keep_checkpoints", "eval_every", "threads")


@dataclass
class Preset:
    name: str
    recipes: dict[str, dict]  # TRAINING_STAGES name -> recipe mapping (paths filled in later)
    configs_n: int = 200  # validation items for the viable-configuration search
    configs_mode: str = "nested"
    # resolution on request (visor.model.resolution): e.g. ["full", "base"] makes the configuration search, and so
    # stage 2, the labels and the router, cover the resolution too; None = full resolution only (as before)
    configs_resolutions: list[str] | None = None
    label_n: int = 1000  # training items labelled for the router
    label_threshold: float = 0.99
    # the answer's probability, not the grader: with exact match an item that every configuration gets wrong is
    # labelled with the cheapest one, and on the tiny models (hard mean ~30%) 89% of the labels were CA-only, which
    # is all the router then learned (docs/training-log.md, "The router")
    label_score: str = "loglik"
    router_epochs: int = 20
    router_lr: float = 2e-3
    # "label": the paper's router, cross-entropy on the labels; "score": it predicts each configuration's stored
    # ``router_score_field`` score and routes on predicted score minus budget x cost (visor.routing.router;
    # docs/training-log.md, "8,000 labels, 2,000 validation items, ..."); see with_router_objective
    router_objective: str = "label"
    router_score_field: str = "grader"
    # the router budget (``--budget``) of the routed rows: logits minus budget x cost / max cost; a number, or
    # "auto": the ``budget`` stage picks one of ``budget_candidates`` on ``budget_n`` validation items by the rule of
    # visor.routing.budget (cheapest within ``budget_tolerance`` of the maximal configuration on both means); never
    # chosen on the test split
    route_budget: float | str = 0.0
    budget_candidates: list[float] = field(default_factory=lambda: [0.5, 0.0, -0.5, -1.0, -2.0])
    # 2,000 (200 per family): on 500 the routed-vs-maximal gaps have 95% intervals several points wide, far wider
    # than the 1-point tolerance; the shipped set's budget (-2) was chosen on 500, and 2,000 pick -1 for the same router
    # (docs/training-log.md, "8,000 labels, 2,000 validation items")
    budget_n: int = 2000
    budget_tolerance: float = 0.01
    batch_size: int = 16  # evaluation / labelling batch
    eval_n: int = 500  # test items per method (50 per family)
    eval_seed: int = 0
    max_new_tokens: int = 16
    timing_items: int = 4  # test items timed per method
    timing_repeats: int = 3
    precision: str = "bf16"  # evaluation autocast on CPU: bf16 | fp32
    data_seed: int = 0  # synth seed for the configs search / labels (training recipes carry their own)
    # a LLaVA-OneVision checkpoint to build VISOR on instead of training the base stages (with_baseline)
    given_baseline: str | None = None
    # a universal VISOR model (a stage-2 run with its viable set) to route and evaluate instead of training stage 1,
    # the configuration search and stage 2 (with_universal)
    given_universal: str | None = None
    notes: list[str] = field(default_factory=list)

    def baseline_stage(self) -> str:
        """The stage whose output is the baseline: a given baseline's, else the last of ``BASELINE_STAGES`` the
        preset has."""
        if GIVEN_BASELINE in self.recipes:
            return GIVEN_BASELINE
        return [name for name in BASELINE_STAGES if name in self.recipes][-1]

    def with_baseline(self, folder: str | Path) -> Preset:
        """This preset with its baseline given: the checkpoint in ``folder`` (written by ``visor train``, kind
        base) replaces the vision and base stages; its recipe (``recipe.json``) says the canvas it trained on."""
        folder = Path(folder)
        recipe = read_baseline_recipe(folder)
        recipes = {k: v for k, v in self.recipes.items() if k != "vision" and k not in BASELINE_STAGES}
        note = f"baseline given (--baseline {folder}): the vision and base stages did not run here"
        return dataclasses.replace(self, recipes={GIVEN_BASELINE: recipe, **recipes},
                                   given_baseline=str(folder.resolve()), notes=[*self.notes, note])

    def with_universal(self, folder: str | Path) -> Preset:
        """This preset with its universal VISOR model given: the stage-2 checkpoint in ``folder`` (written by
        ``visor train``, kind visor-stage2, its viable set recorded, no token reducers) replaces stage 1, the
        configuration search and stage 2; the labels, the router and what follows run on it. It must have been built
        on the preset's baseline (give that with :meth:`with_baseline`): the comparison is against it."""
        folder = Path(folder)
        recipe = read_universal_recipe(folder)
        recipes = {k: v for k, v in self.recipes.items() if k not in UNIVERSAL_STAGES}
        note = (f"universal model given (--universal {folder}): stage 1, the configuration search and stage 2 did not "
                "run here; the labels, the router and what follows did")
        return dataclasses.replace(self, recipes={**recipes, GIVEN_UNIVERSAL: recipe},
                                   given_universal=str(folder.resolve()), notes=[*self.notes, note])

    def with_router_objective(self, objective: str) -> Preset:
        """This preset with a ``"label"`` or ``"score"`` router. A score router's budget is in score units (0.01 =
        one point of predicted accuracy per maximal configuration's cost), so switching to it sets the budget
        candidates to :data:`SCORE_BUDGETS`, and switching back restores the label router's defaults."""
        if objective not in ("label", "score"):
            raise ValueError(f"router objective must be 'label' or 'score', got {objective!r}")
        if objective == self.router_objective:
            return self
        default = Preset.__dataclass_fields__["budget_candidates"].default_factory()
        candidates = SCORE_BUDGETS if objective == "score" else default
        return dataclasses.replace(self, router_objective=objective, budget_candidates=list(candidates),
                                   notes=[*self.notes, f"router objective: {objective} (budgets {list(candidates)})"])

    def benchmark_image_size(self) -> int | None:
        """The procedural benchmark's canvas (``data.synth_image_size``; None = SynthConfig's 192 px) that the
        baseline and VISOR train on and every method is evaluated at: the baseline's recipe
        (:meth:`baseline_stage`), which the VISOR stages must match; an earlier stage (``base`` before
        ``focus``) may pre-train on another canvas."""
        baseline = self.baseline_stage()
        sizes = {stage: (self.recipes[stage].get("data") or {}).get("synth_image_size")
                 for stage in (baseline, "stage1", "stage2", "stage2b", GIVEN_UNIVERSAL, "tr") if stage in self.recipes}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"preset {self.name!r}: the baseline and VISOR stages train on different benchmark "
                             f"canvases (data.synth_image_size {sizes}); they are evaluated on one")
        return next(iter(sizes.values()), None)

    def stage_settings(self) -> dict:
        """Everything but the recipes (recorded beside shipped checkpoints)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("recipes", "notes")}


#: budget candidates of a score router (score units; ``Preset.with_router_objective``)
SCORE_BUDGETS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)


def recipes_dir() -> Path:
    """The repository's ``recipes/`` folder (next to the ``visor`` package)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def full_preset(folder: Path | None = None) -> Preset:
    folder = Path(folder) if folder else recipes_dir()
    recipes = {}
    for stage, name in FULL_RECIPES.items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"recipe {path} not found: `visor reproduce --train` reads the repository's recipes/")
        recipes[stage] = yaml.safe_load(path.read_text())
    return Preset(name="full", recipes=recipes, route_budget="auto")


# a model that trains in seconds: 192 px procedural images, 64 px base view, patch 16 (172 visual tokens),
# 9 decoder layers (3 CA layers, 3 SA slots, as the full tiny model)
QUICK_MODEL = dict(image_size=64, patch_size=16, max_tiles_per_side=3, max_views=9, vision_layers=1, vision_hidden=16,
                   vision_heads=2, vision_mlp=32, text_layers=9, hidden=32, heads=4, kv_heads=2, mlp=64)


def quick_preset() -> Preset:
    common = dict(model=QUICK_MODEL, data={"source": "synth", "val_n": 2}, precision="fp32", threads=1,
                  log_every=1, eval_every=0, keep_checkpoints=1)
    recipes = {
        "vision": dict(kind="vision", optim={"lr": 3e-3, "warmup_steps": 1}, global_batch=8, micro_batch=8,
                       max_steps=2, save_every=2, **common),
        "base": dict(kind="base", freeze_vision=True, optim={"lr": 3e-3, "warmup_steps": 2}, global_batch=4,
                     micro_batch=4, max_steps=6, save_every=3, **common),
        "focus": dict(kind="base", freeze_vision=True, optim={"lr": 1e-3, "warmup_steps": 1}, global_batch=4,
                      micro_batch=4, max_steps=2, save_every=2,
                      **{**common, "data": {**common["data"], "family_weights": {"code": 2, "doc": 2}, "questions_per_image": 2}}),
        "stage1": dict(kind="visor-stage1", optim={"lr": 3e-3, "warmup_steps": 1}, global_batch=4, micro_batch=4,
                       max_steps=3, save_every=3, **common),
        "stage2": dict(kind="visor-stage2", freeze_vision=True, optim={"lr": 1e-3, "warmup_steps": 1}, global_batch=4,
                       micro_batch=4, max_steps=4, save_every=2, **common),
        "tr": dict(kind="visor-stage2", freeze_vision=True, reducers=["pooling:2x", "pooling:4x"],
                   optim={"lr": 1e-3, "warmup_steps": 1}, global_batch=4, micro_batch=4, max_steps=2, save_every=2, **common),
    }
    return Preset(name="quick", recipes=recipes, configs_n=10, label_n=10, router_epochs=3, batch_size=10, eval_n=20,
                  route_budget="auto", budget_candidates=[0.0, -1.0], budget_n=10,
                  max_new_tokens=4, timing_items=1, timing_repeats=2, precision="fp32",
                  notes=["--quick: minute-scale models trained for a few steps; the numbers are meaningless, the flow is real"])


def read_baseline_recipe(folder: Path) -> dict:
    """The recipe a LLaVA-OneVision checkpoint was trained with (its ``recipe.json``), or a clear error."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--baseline: {folder} holds no config.json (a checkpoint folder, e.g. a run's final/)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "llava_onevision":
        raise ValueError(f"--baseline: {folder} is a {model_type!r} checkpoint; VISOR is built on a LLaVA-OneVision one")
    path = folder / "recipe.json"
    if not path.is_file():
        raise FileNotFoundError(f"--baseline: {folder} has no recipe.json: the pipeline reads the benchmark canvas the "
                                "baseline trained on from the recipe that `visor train` saves beside its model")
    recipe = json.loads(path.read_text())
    if recipe.get("kind") != "base":
        raise ValueError(f"--baseline: {path} is a {recipe.get('kind')!r} recipe, not a base one")
    return recipe


def read_universal_recipe(folder: Path) -> dict:
    """The recipe a universal VISOR model was trained with (its ``recipe.json``: stage 2 without token reducers), or a
    clear error; the model must carry its viable set (``visor configs`` ran before its stage 2)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--universal: {folder} holds no config.json (a checkpoint folder, e.g. a run's final/)")
    config = json.loads(config.read_text())
    if config.get("model_type") != "visor":
        raise ValueError(f"--universal: {folder} is a {config.get('model_type')!r} checkpoint, not a VISOR one")
    if not config.get("viable_configs"):
        raise ValueError(f"--universal: {folder} has no viable configurations: a universal model is a stage-2 run "
                         "(after `visor configs`), not a stage-1 one")
    path = folder / "recipe.json"
    if not path.is_file():
        raise FileNotFoundError(f"--universal: {folder} has no recipe.json (the recipe `visor train` saves beside its "
                                "model, recorded with the shipped set)")
    recipe = json.loads(path.read_text())
    if recipe.get("kind") != "visor-stage2" or recipe.get("reducers"):
        what = "a VISOR-TR (reducers)" if recipe.get("reducers") else f"a {recipe.get('kind')!r}"
        raise ValueError(f"--universal: {path} is {what} recipe, not a universal stage-2 one")
    return recipe


def tower_mismatch(baseline: Path, universal: Path, rtol: float = 1e-2) -> str | None:
    """Why ``universal`` looks built on another baseline than ``baseline``, or ``None``: VISOR's stages keep the
    vision tower frozen, so a universal model built on this baseline carries its tower's weights (up to bf16 rounding,
    hence ``rtol``). A stage that trained the tower also differs, so the caller warns rather than refuses."""
    import torch

    from visor.convert.llava_onevision import load_hf_state_dict

    def tower(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in load_hf_state_dict(folder).items() if k.startswith("vision_tower.")}

    ours, theirs = tower(baseline), tower(universal)
    if not ours or set(ours) != set(theirs):
        return (f"the vision towers of {baseline} and {universal} have different parameters "
                f"({len(ours)} and {len(theirs)} tensors)")
    differing = [k for k in sorted(ours) if ours[k].shape != theirs[k].shape
                 or not torch.allclose(ours[k], theirs[k], rtol=rtol, atol=1e-6)]
    if differing:
        return (f"{len(differing)} of {len(ours)} vision-tower tensors of {universal} differ from {baseline}'s (e.g. "
                f"{differing[0]}): built on another baseline, or a stage trained the tower")
    return None


def baseline_provenance(folder: Path, limit: int = 10) -> dict[str, dict]:
    """A given baseline's recipe and its ancestors' (each run's ``init``, as long as that folder still holds a
    ``recipe.json``), named ``baseline``, ``baseline-init-1``, ...: what made the checkpoint, recorded with it.

    An ``init`` that is the baseline of a shipped set (``checkpoints/base``) ends the walk with the ancestors that the
    set recorded for it (its ``recipes/baseline-init-K.yaml``): their run folders are usually gone, their recipes are
    not."""
    return _provenance(GIVEN_BASELINE, read_baseline_recipe(folder), limit)


def universal_provenance(folder: Path, limit: int = 10) -> dict[str, dict]:
    """A given universal model's recipe and its ancestors', named ``universal``, ``universal-init-1``, ... (as
    :func:`baseline_provenance`). An ``init`` that is a shipped set's universal model (``checkpoints/visor``) ends
    the walk with what the set recorded before it: its stage 1 (stage 2 and stage 1 when it continued stage 2; for a
    set that was itself given its universal model, that model's recorded ancestors)."""
    return _provenance(GIVEN_UNIVERSAL, read_universal_recipe(folder), limit)


def _provenance(name: str, recipe: dict, limit: int) -> dict[str, dict]:
    chain = {name: recipe}
    for depth in range(1, limit + 1):
        init = Path(recipe["init"]) if recipe.get("init") else None
        if init is None or not (init / "recipe.json").is_file():
            break
        recipe = json.loads((init / "recipe.json").read_text())
        chain[f"{name}-init-{depth}"] = recipe
        recorded = _shipped_ancestors(init, name)
        if recorded is not None:
            for k, ancestor in enumerate(recorded, start=depth + 1):
                chain[f"{name}-init-{k}"] = ancestor
            break
    return chain


def _shipped_ancestors(folder: Path, name: str) -> list[dict] | None:
    """The recorded ancestors' recipes (oldest last) when ``folder`` is a shipped set's baseline (``name`` baseline)
    or universal model (``name`` universal), else ``None``."""
    from visor.reproduce.shipped import MANIFEST, load_shipped  # shipped.py imports this module

    if not (folder.parent / MANIFEST).is_file():
        return None
    shipped = load_shipped(folder.parent, verify=False)
    member = shipped.base if name == GIVEN_BASELINE else shipped.visor
    if member.resolve() != folder.resolve():
        return None
    if name == GIVEN_UNIVERSAL and GIVEN_UNIVERSAL not in shipped.recipes:  # its model: stage 2's, or stage2b's
        before = ("stage2", "stage1") if "stage2b" in shipped.recipes else ("stage1",)
        return [shipped.recipes[k].to_dict() for k in before if k in shipped.recipes]
    ancestors, k = [], 1
    while f"{name}-init-{k}" in shipped.recipes:
        ancestors.append(shipped.recipes[f"{name}-init-{k}"].to_dict())
        k += 1
    return ancestors


def cache_spec(recipe: dict) -> dict:
    """A recipe without its paths and logging knobs: what decides a training stage's result."""
    return {k: v for k, v in recipe.items() if k not in PATH_FIELDS + NON_RESULT_FIELDS}


def preset_from_settings(settings: dict, recipes: dict) -> Preset:
    """The preset recorded beside shipped checkpoints (``recipes/pipeline.yaml`` + the stage recipes)."""
    names = {f.name for f in dataclasses.fields(Preset)} - {"recipes", "notes"}
    known = {k: v for k, v in (settings or {}).items() if k in names}
    known.setdefault("name", "shipped")
    as_dicts = {k: (r.to_dict() if hasattr(r, "to_dict") else dict(r)) for k, r in recipes.items()}
    return Preset(recipes=as_dicts, **known)
