"""The ``visor reproduce`` pipeline: base -> stage 1 -> viable configurations -> stage 2 -> pseudo-labels ->
router -> evaluation of every method -> table and results.

Stages and their folders under the work directory (``--work-dir``; caching and resume:
``visor.reproduce.stages``)::

    1-vision/run/final     dense pre-training of the tiny SigLIP tower           (recipe kind vision)
    2-base/run/final       the LLaVA-OV baseline, trained from scratch            (kind base)
    2b-focus/run/final     optional: the baseline continued under its own recipe (kind base, init = 2-base)
    2c-focus2/run/final    optional: continued once more (kind base, init = the previous base run)
    2d-focus3/run/final    optional: and once more
    2e-focus4/run/final    optional: and once more, with a shape head on the tower (``vision_shape_weight``)
    3-stage1/run/final     VISOR stage 1: new blocks only                         (kind visor-stage1)
    4-configs/out          viable configurations written into the stage-1 model   (``visor configs``)
    5-stage2/run/final     VISOR stage 2: the universal model                     (kind visor-stage2)
    5b-stage2b/run/final   optional: stage 2 continued under its own recipe (kind visor-stage2, init = 5-stage2);
                           then it is the universal model
    6-labels/labels.jsonl  router pseudo-labels on training items                 (``visor route label``)
    7-router/model         the universal model with its router                    (``visor route train``)
    8-budget/budget.json   optional (``route_budget: auto``): the router budget chosen on validation items
                           (``visor route report`` + ``visor.routing.budget``)
    9-tr/run/final         optional: VISOR-TR, the routed model fine-tuned on reduced tokens (kind visor-stage2
                           with ``reducers``; the VISOR-TR rows run it); runs right after the router
    eval/<method>/         per-method predictions on the test split               (``visor eval``)
    timing/timing.json     measured prefill times

``--baseline DIR`` replaces stages 1-2e with a given LLaVA-OV checkpoint, and ``--universal DIR`` (with it) stages 3-5b
with a given universal model (e.g. a shipped one trained further): the labels, router and evaluation run on it.

Plain ``visor reproduce`` skips the training stages and evaluates the shipped checkpoints
(``visor.reproduce.shipped``); its evaluations are cached under ``<work-dir>/shipped-<id>/``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from visor.precision import autocast as _autocast
from visor.reproduce.evaluation import EvalSpec, run_all
from visor.reproduce.presets import (GIVEN_BASELINE, GIVEN_UNIVERSAL, TRAINING_STAGES, Preset, baseline_provenance,
                                     cache_spec, tower_mismatch, universal_provenance)
from visor.reproduce.stages import StageCache, StageInterrupted, StageResult, digest

STAGE_NAMES = ("vision", "base", "focus", "focus2", "focus3", "focus4", "stage1", "configs", "stage2", "stage2b", "labels", "router", "budget",
               "tr")


@dataclass
class Trained:
    base: Path
    visor: Path
    stages: dict[str, StageResult]
    recipes: dict[str, dict]  # the recipes as run (paths filled in)
    route_budget: float = 0.0  # the routed rows' router budget: the preset's number, or the budget stage's choice
    budget_choice: dict | None = None  # the budget stage's record (visor.routing.budget.choose_budget)
    visor_tr: Path | None = None  # the tr stage's model (VISOR-TR), when the preset has one


def _synth_config(preset: Preset):
    from visor.data.synth.config import DEFAULT_CONFIG

    return DEFAULT_CONFIG.with_image_size(preset.benchmark_image_size())


def choose_route_budget(model_folder: Path, preset: Preset, folder: Path, progress: bool = True) -> dict:
    """The router budget by the preset's rule (``visor.routing.budget.choose_budget``): the routed model in
    ``model_folder`` against its fixed configurations on ``preset.budget_n`` validation items, at each of
    ``preset.budget_candidates``. Writes ``folder/budget.json`` (the choice) and ``folder/report/`` (the route
    report); returns the choice. The pipeline's budget stage and ``visor reproduce --choose-budget`` run it."""
    from visor.eval.harness import synth_items
    from visor.routing.budget import choose_budget
    from visor.routing.report import format_report, route_report

    model, tokenizer, processor = _load_visor(model_folder)
    items = synth_items("val", preset.budget_n, seed=preset.data_seed, config=_synth_config(preset))
    with _autocast(preset.precision):
        report = route_report(model, tokenizer, processor, items, folder / "report",
                              budgets=tuple(preset.budget_candidates), batch_size=preset.batch_size, progress=progress)
    choice = choose_budget(report["rows"], tolerance=preset.budget_tolerance)
    (folder / "budget.json").write_text(json.dumps(choice, indent=2))
    (folder / "report" / "route_report.txt").write_text(format_report(report) + "\n")
    return choice


def _load_visor(folder: Path):
    from visor.data.tokenizer import load_tokenizer
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.train.models import image_processor_for

    model = VisorForConditionalGeneration.from_pretrained(str(folder))
    return model, load_tokenizer(folder), image_processor_for(model.config)


def finished_run(out_dir: str | Path) -> Path | None:
    """``OUT_DIR/final`` when that training run finished (its ``recipe.json`` is written last), else ``None``."""
    final = Path(out_dir) / "final"
    return final if (final / "recipe.json").exists() else None


def train_stage_distributed(data: dict, folder: Path, nproc: int, progress: bool = True) -> Path | None:
    """Run one training stage as ``torchrun --nproc_per_node NPROC -m visor train RECIPE --resume`` (DDP;
    gloo on CPU, NCCL on GPU): the recipe as run is written to ``FOLDER/recipe-ddp.yaml``. The sample
    order and the loss normalisation make N processes train the same parameters as one (``visor.train.loop``),
    so a stage may be resumed with a different number of processes. Ctrl-C reaches the workers with the
    terminal's process group; SIGTERM to this process is forwarded; either way they save and stop. Returns
    ``RUN/final`` when the run finished, else ``None``."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    if (final := finished_run(data["out_dir"])) is not None:  # nothing to launch
        return final
    threads = int(data.get("threads") or 1)
    per_rank, remainder = divmod(int(data["global_batch"]), nproc)
    if remainder:
        raise ValueError(f"--nproc {nproc} does not divide the stage's global batch {data['global_batch']}")
    # the largest micro-batch <= the recipe's that splits each rank's share: the same samples per step
    micro = max(m for m in range(1, min(int(data["micro_batch"]), per_rank) + 1) if per_rank % m == 0)
    data = {**data, "micro_batch": micro}
    recipe_file = folder / "recipe-ddp.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps({**data, "distributed": "ddp", "threads": threads}))  # tuples -> lists for YAML
    recipe_file.write_text(yaml.safe_dump(plain, sort_keys=False))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               "-m", "visor", "train", str(recipe_file), "--resume"] + ([] if progress else ["--no-progress"])
    child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    stopped = []  # a signal reached us (and so the workers): their non-zero exit is an interruption, not a failure

    def forward(signum, frame) -> None:
        stopped.append(signum)
        child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # the workers got it too (same process group): let them save
                stopped.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if (final := finished_run(data["out_dir"])) is not None:
        return final
    if code != 0 and not stopped and code not in (-signal.SIGTERM, -signal.SIGINT):
        raise RuntimeError(f"the distributed training stage failed (exit status {code}): {' '.join(command)}")
    return None


def train_all(preset: Preset, cache: StageCache, *, progress: bool = True,
              log: Callable[[str], None] = print, on_stage: Callable[[str], None] | None = None,
              nproc: int = 1) -> Trained:
    """Run (or skip, or resume) every training-side stage; returns the two checkpoints to evaluate.

    ``nproc`` > 1 runs each training stage under torchrun with that many DDP processes
    (:func:`train_stage_distributed`); the stages' cache keys do not depend on it."""
    from visor.train.loop import Trainer
    from visor.train.recipe import Recipe, build

    stages: dict[str, StageResult] = {}
    recipes: dict[str, dict] = {}
    on_stage = on_stage or (lambda name: None)

    def training(name: str, number: int | str, paths: dict[str, str], inputs: dict[str, str]) -> StageResult:
        on_stage(name)
        raw = dict(preset.recipes[name])
        raw["kind"] = TRAINING_STAGES[name]

        def body(folder: Path) -> dict:
            data = {**raw, **paths, "out_dir": str(folder / "run")}
            recipe = build(Recipe, data, where=f"{preset.name} preset, stage {name}")
            final = finished_run(recipe.out_dir)  # finished, then stopped before the stage was marked complete
            if final is not None:
                log(f"stage {name}: its run had finished; not evaluated or exported again")
            elif nproc > 1:
                final = train_stage_distributed(recipe.to_dict(), folder, nproc, progress)
            else:
                final = Trainer(recipe, resume=True, progress=progress).train()
            if final is None:
                raise StageInterrupted(f"stage {name} stopped before its last step; rerun the same command to resume "
                                       f"from its newest checkpoint in {folder / 'run' / 'checkpoints'}")
            return {"final": "run/final"}

        result = cache.run(name, f"{number}-{name}", cache_spec(raw), inputs, body, resumable=True)
        recipes[name] = {**raw, **paths, "out_dir": str(result.folder / "run")}
        _report(log, result)
        return result

    synth = _synth_config(preset)
    settings = preset.stage_settings()

    if preset.given_baseline is not None:  # visor reproduce --baseline: no base stage runs
        baseline = stages[GIVEN_BASELINE] = given_stage(GIVEN_BASELINE, Path(preset.given_baseline))
        recipes.update(baseline_provenance(Path(preset.given_baseline)))
        log(f"[baseline] given: {preset.given_baseline} (id {baseline.output_id[:12]})")
    else:
        vision = stages["vision"] = training("vision", 1, {}, {})
        baseline = stages["base"] = training("base", 2, {"vision_init": str(vision.path("final"))},
                                             {"vision": vision.output_id})
        # the baseline continued (e.g. towards the hard families)
        for name, number in (("focus", "2b"), ("focus2", "2c"), ("focus3", "2d"), ("focus4", "2e")):
            if name in preset.recipes:
                baseline = stages[name] = training(name, number, {"init": str(baseline.path("final"))},
                                                   {"base": baseline.output_id})
    if preset.given_universal is not None:  # visor reproduce --universal: no stage 1, search or stage 2 runs
        stage2 = stages[GIVEN_UNIVERSAL] = given_stage(GIVEN_UNIVERSAL, Path(preset.given_universal))
        recipes.update(universal_provenance(Path(preset.given_universal)))
        log(f"[universal] given: {preset.given_universal} (id {stage2.output_id[:12]})")
        mismatch = tower_mismatch(baseline.path("final"), stage2.path("final"))
        if mismatch:
            log(f"[universal] warning: {mismatch}; the comparison assumes it was built on the given baseline")
            preset.notes.append(f"warning: {mismatch}")
    else:
        stage1 = stages["stage1"] = training("stage1", 3, {"init": str(baseline.path("final"))}, {"base": baseline.output_id})

        # ---- viable configurations
        on_stage("configs")

        def configs_body(folder: Path) -> dict:
            from visor.eval.harness import synth_items
            from visor.train.configs import search_configs, write_viable

            source = stage1.path("final")
            model, tokenizer, processor = _load_visor(source)
            items = synth_items("val", preset.configs_n, seed=preset.data_seed, config=synth)
            with _autocast(preset.precision):
                search = search_configs(model, tokenizer, processor, items, mode=preset.configs_mode,
                                        batch_size=preset.batch_size, progress=progress, log=log,
                                        **({"resolutions": preset.configs_resolutions} if preset.configs_resolutions else {}))
            write_viable(model, search)
            shutil.copytree(source, folder / "out")
            model.save_pretrained(str(folder / "out"))
            (folder / "search.json").write_text(json.dumps({
                "viable": list(model.config.viable_configs), "slot_order": search.slot_order,
                "scores": {(c.label() if hasattr(c, "label") else "+".join(map(str, c)) or "none"): s
                           for c, s in search.scores.items()}}, indent=2, default=str))
            (folder / "search.txt").write_text(search.table() + "\n")
            return {"model": "out", "search": "search.json"}

        configs_key = {k: settings[k] for k in ("configs_n", "configs_mode", "data_seed", "precision")}
        if preset.configs_resolutions:  # only when set: the key of a full-resolution search stays what it was
            configs_key["configs_resolutions"] = list(preset.configs_resolutions)
        configs = stages["configs"] = cache.run("configs", "4-configs", configs_key, {"stage1": stage1.output_id}, configs_body)
        _report(log, configs)

        stage2 = stages["stage2"] = training("stage2", 5, {"init": str(configs.path("model"))}, {"configs": configs.output_id})
        if "stage2b" in preset.recipes:  # stage 2 continued under its own recipe: the universal model from here on
            stage2 = stages["stage2b"] = training("stage2b", "5b", {"init": str(stage2.path("final"))},
                                                  {"stage2": stage2.output_id})

    # ---- pseudo-labels
    on_stage("labels")
    label_spec = {k: settings[k] for k in ("label_n", "label_threshold", "label_score", "data_seed", "batch_size", "precision")}

    def label_items_for():
        from visor.eval.harness import synth_items

        return synth_items("train", preset.label_n, seed=preset.data_seed, config=synth)

    def labels_body(folder: Path) -> dict:
        from visor.routing.labels import label_items, label_summary, write_labels

        model, tokenizer, processor = _load_visor(stage2.path("final"))
        viable = [c if isinstance(c, dict) else tuple(c) for c in model.config.viable_configs]  # dict: with a resolution
        with _autocast(preset.precision):
            rows = label_items(model, tokenizer, processor, label_items_for(), viable, threshold=preset.label_threshold,
                               score=preset.label_score, batch_size=preset.batch_size, progress=progress)
        write_labels(rows, folder / "labels.jsonl")
        (folder / "labels.summary.json").write_text(json.dumps(label_summary(rows), indent=2))
        return {"labels": "labels.jsonl"}

    labels = stages["labels"] = cache.run("labels", "6-labels", label_spec, {"stage2": stage2.output_id}, labels_body)
    _report(log, labels)

    # ---- router
    on_stage("router")
    router_spec = {k: settings[k] for k in ("router_epochs", "router_lr", "batch_size", "precision", "label_n", "data_seed")}
    if preset.router_objective != "label":  # only then: label routers keep the cache keys they had before the choice
        router_spec |= {k: settings[k] for k in ("router_objective", "router_score_field")}

    def router_body(folder: Path) -> dict:
        from visor.routing.labels import read_labels
        from visor.routing.train import save_router_checkpoint, train_router

        from visor.model.resolution import parse_configuration

        model, tokenizer, processor = _load_visor(stage2.path("final"))
        viable = [c if isinstance(c, dict) else tuple(c) for c in model.config.viable_configs]  # dict: with a resolution
        parsed = [parse_configuration(c, model.plan) for c in viable]
        rows = {row["id"]: row for row in read_labels(labels.path("labels"))}
        items = [it for it in label_items_for() if it.id in rows]
        targets = [parsed.index(parse_configuration(rows[it.id]["label"], model.plan)) for it in items]
        scores = None
        if preset.router_objective == "score":
            from visor.routing.labels import score_targets

            scores = score_targets(rows, items, viable, model.plan, preset.router_score_field)
        result = train_router(model, tokenizer, processor, items, targets, viable, epochs=preset.router_epochs,
                              lr=preset.router_lr, batch_size=preset.batch_size, seed=preset.data_seed,
                              progress=progress, autocast=preset.precision == "bf16", score_targets=scores)
        save_router_checkpoint(model, tokenizer, processor, result, folder / "model", stage2.path("final"))
        return {"model": "model"}

    router = stages["router"] = cache.run("router", "7-router", router_spec, {"labels": labels.output_id}, router_body)
    _report(log, router)
    trained = Trained(base=baseline.path("final"), visor=router.path("model"), stages=stages, recipes=recipes)
    if "tr" in preset.recipes:  # VISOR-TR: the routed model (its router carried, frozen) fine-tuned on reduced tokens
        tr = stages["tr"] = training("tr", 9, {"init": str(router.path("model"))}, {"router": router.output_id})
        trained.visor_tr = tr.path("final")
    if preset.route_budget != "auto":
        trained.route_budget = float(preset.route_budget)
        return trained

    # ---- the router budget, chosen on the validation split
    on_stage("budget")
    budget_spec = {k: settings[k] for k in ("budget_n", "budget_candidates", "budget_tolerance", "batch_size",
                                            "precision", "data_seed")}

    def budget_body(folder: Path) -> dict:
        choose_route_budget(router.path("model"), preset, folder, progress=progress)
        return {"budget": "budget.json", "report": "report"}

    budget = stages["budget"] = cache.run("budget", "8-budget", budget_spec, {"router": router.output_id}, budget_body)
    _report(log, budget)
    from visor.routing.budget import describe

    trained.budget_choice = json.loads(budget.path("budget").read_text())
    trained.route_budget = float(trained.budget_choice["budget"])
    log(f"[budget] on {preset.budget_n} validation items: {describe(trained.budget_choice)}")
    return trained


def given_stage(name: str, folder: Path) -> StageResult:
    """A given checkpoint (``name``: the baseline, or the universal model) as the stage result the later stages
    build on: its id is the hash of its files' contents, so they are redone when the checkpoint changes and reused
    when only its path does."""
    from visor.reproduce.shipped import sha256_file

    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    output_id = digest({f"given_{name}": files})
    return StageResult(name, folder, key=output_id, output_id=output_id, outputs={"final": "."}, cached=True)


def _report(log, result: StageResult) -> None:
    state = "cached" if result.cached else f"done in {result.seconds:.0f}s"
    log(f"[{result.name}] {state}: {result.folder}")


def eval_spec_for(preset: Preset, n: int | None = None, seed: int | None = None, timing: bool = True,
                  route_budget: float | None = None, selector_positions: str = "contiguous") -> EvalSpec:
    """The evaluation settings of a preset; ``route_budget`` overrides the preset's (needed when it is ``auto``:
    the budget stage's choice); ``selector_positions``: see ``EvalSpec``."""
    if route_budget is None:
        if preset.route_budget == "auto":
            raise ValueError("the preset's router budget is chosen by the budget stage (route_budget: auto): "
                             "pass the chosen route_budget")
        route_budget = float(preset.route_budget)
    synth = {}
    size = preset.benchmark_image_size()
    if size:
        synth["image_size"] = size
    return EvalSpec(n=n or preset.eval_n, seed=preset.eval_seed if seed is None else seed, batch_size=preset.batch_size,
                    max_new_tokens=preset.max_new_tokens, precision=preset.precision, timing_items=preset.timing_items,
                    timing_repeats=preset.timing_repeats, timing=timing, synth=synth, route_budget=route_budget,
                    selector_positions=selector_positions)


def evaluate_checkpoints(cache: StageCache, base: Path, visor: Path, model_ids: dict[str, str], spec: EvalSpec, *,
                         progress: bool = True, log: Callable[[str], None] = print, visor_tr: Path | None = None) -> dict:
    started = time.time()
    data = run_all(cache, base, visor, model_ids, spec, progress=progress, log=log, visor_tr_dir=visor_tr)
    data["meta"]["eval_seconds"] = time.time() - started
    return data


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
