"""``visor reproduce``: the VISOR paper's comparison at small scale, with the token-compression peers.

    visor reproduce                    # evaluate the shipped checkpoints (checkpoints/) on a fresh test split
    visor reproduce --quick            # every stage on minute-scale models (~2 minutes; numbers meaningless)
    visor reproduce --train [--ship]   # retrain everything from scratch (hours, resumable), then ship

Prints the comparison table and writes ``reproduce.csv`` / ``.json`` / ``.md``, the Pareto and ablation plots
and every method's per-item predictions to ``--out``. Stages are cached and resumed under ``--work-dir``
(``visor.reproduce.stages``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visor.cli.common import print_json_line


def register(subparsers) -> None:
    from visor.reproduce.pipeline import STAGE_NAMES

    parser = subparsers.add_parser(
        "reproduce",
        help="the paper's comparison end to end: table, CSV/JSON/Markdown, plots (shipped checkpoints, --quick, --train)",
        description="Reproduce VISOR's comparison at small scale: the LLaVA-OV baseline, token compression "
        "(pooling, VisionZip, VisPruner, HiRED, FastV, PyramidDrop at a budget matched to VISOR routed), VISOR's "
        "fixed configurations, VISOR routed, VISOR with token reduction. Without --train/--quick it evaluates the "
        "shipped checkpoints (--checkpoints) on a freshly generated test split. Every stage is cached under "
        "--work-dir and skipped when its settings and inputs are unchanged; an interrupted training stage resumes "
        "from its newest checkpoint when the same command is run again.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true",
                      help="retrain every stage from scratch with the repository's tiny recipes (hours on a CPU; resumable)")
    mode.add_argument("--quick", action="store_true",
                      help="run every stage on minute-scale models in about two minutes (flow real, numbers meaningless)")
    parser.add_argument("--ship", action="store_true",
                        help="with --train/--quick: copy the final checkpoints, their recipes and a manifest to --checkpoints")
    parser.add_argument("--ship-dtype", choices=["fp32", "bf16"], default="fp32",
                        help="--ship: store the weights in fp32 (default) or bf16 (half the size)")
    parser.add_argument("--checkpoints", default=None, metavar="DIR",
                        help="shipped-checkpoints folder to evaluate (or --ship to) (default: checkpoints/)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="run folders and caches (default runs/reproduce, runs/reproduce-quick with --quick)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="results folder (default results/reproduce, results/reproduce-quick with --quick)")
    parser.add_argument("--n", type=int, default=None, metavar="N", help="test items (default: the preset's; full 500)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="test split seed (default 0)")
    parser.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                        choices=list(STAGE_NAMES) + ["eval", "timing"],
                        help="redo these stages (and, through their new outputs, everything after them)")
    parser.add_argument("--recipes", default=None, metavar="DIR", help="--train: folder of the tiny recipes (default recipes/)")
    parser.add_argument("--no-timing", action="store_true", help="skip the measured prefill speedup column")
    parser.add_argument("--selector-positions", choices=["contiguous", "original"], default="contiguous",
                        help="how the pre-LLM selectors' rows (VisionZip, VisPruner, HiRED, VISOR + VisionZip) number "
                             "the kept tokens: contiguous, as the methods' own code does (default), or original, each "
                             "at its position in the full prompt (rows labelled '@original'; give it its own --out and "
                             "--work-dir, since those rows' cached evaluations are replaced)")
    parser.add_argument("--resolutions", default=None, metavar="LIST",
                        help="--train/--quick: resolution on request, e.g. 'full,base': the configuration search, stage 2, "
                             "labels and router also cover the input resolution (visor.model.resolution; give it its own --work-dir); "
                             "default full only")
    parser.add_argument("--reuse-from", default=None, metavar="DIR",
                        help="--train/--quick: take every stage that another work dir holds complete with the same "
                             "settings and inputs from there, as hard links (no copies; a stale copy in --work-dir is "
                             "moved aside), so a variant such as --resolutions full,base starts from the same trained "
                             "models; stages whose settings differ run here as usual")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="--train/--quick: build VISOR on this LLaVA-OneVision checkpoint (a folder that `visor train` "
                             "wrote, with its recipe.json) instead of training the vision and base stages; it is the "
                             "baseline row, and --ship records its recipe and its ancestors' (each run's init)")
    parser.add_argument("--universal", default=None, metavar="DIR",
                        help="--train/--quick, with --baseline: route and evaluate this universal VISOR model (a stage-2 "
                             "run's final/ folder, e.g. a shipped set's visor/ trained further) instead of training "
                             "stage 1, the configuration search and stage 2; it must have been built on --baseline (a "
                             "vision tower that differs from the baseline's is warned about: VISOR's stages keep it "
                             "frozen), and --ship records its recipe and its ancestors'")
    parser.add_argument("--router", choices=["label", "score"], default="label",
                        help="--train/--quick: the router to train: label (the paper's: cross-entropy on the pseudo-labels) "
                             "or score (predicts each configuration's grader score; budgets in score units, "
                             "visor.reproduce.presets.SCORE_BUDGETS); default label")
    parser.add_argument("--label-n", type=int, default=None, metavar="N",
                        help="--train/--quick: training items to label for the router (default: the preset's; full 1000)")
    parser.add_argument("--budget-n", type=int, default=None, metavar="N",
                        help="--train/--quick: validation items the router budget is chosen on (default: the preset's; "
                             "full 2000)")
    parser.add_argument("--threads", type=int, default=None, metavar="T", help="torch threads (default: torch's)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                        help="evaluation, labelling and budget search in bf16 autocast or fp32 (default: auto, bf16 where "
                             "the CPU has AMX or on a GPU, fp32 elsewhere, where bf16 is several times slower; --quick "
                             "keeps its fp32). The README's table ran in bf16: pass --precision bf16 to get it exactly")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="--train/--quick: run each training stage under torchrun with N DDP processes "
                             "(each with the recipe's threads; the cache does not depend on N, so a stage can resume "
                             "with another N); default 1 (in this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--status", action="store_true",
                        help="print where the runs in --work-dir stand (stage, step, loss, samples/s, time left, "
                             "latest validation) and exit; loads no model, safe beside a running reproduce")
    parser.add_argument("--add-tr", default=None, metavar="RUN",
                        help="add a VISOR-TR model to the shipped set in --checkpoints (default checkpoints/): RUN is "
                             "the final/ folder of `visor train recipes/visor-tr-tiny.yaml`, fine-tuned from that set's "
                             "universal model (checked); recorded in its manifest, then exit")
    parser.add_argument("--choose-budget", action="store_true",
                        help="choose the router budget of the shipped set in --checkpoints again, by the pipeline's "
                             "rule on --budget-n validation items (default: this version's preset, full 2000), record "
                             "it in the set's recipes/pipeline.yaml and manifest (plain `visor reproduce` then routes "
                             "at it), then exit")
    parser.add_argument("--replot", default=None, metavar="DIR",
                        help="rewrite the table, CSV, Markdown report and plots of a results folder from its "
                             "reproduce.json (no model is loaded or evaluated) and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from visor.reproduce.pipeline import set_threads

    mode = "quick" if args.quick else "train" if args.train else "shipped"
    if args.status:
        return _status(Path(args.work_dir or ("runs/reproduce-quick" if mode == "quick" else "runs/reproduce")))
    if args.replot:
        return _replot(Path(args.replot))
    if args.add_tr:
        return _add_tr(args)
    if any(n is not None and n < 1 for n in (args.label_n, args.budget_n)):
        print("visor reproduce: --label-n and --budget-n must be at least 1", file=sys.stderr)
        return 2
    if args.choose_budget:
        if mode != "shipped":
            print("visor reproduce: --choose-budget re-chooses a shipped set's budget; --train and --quick choose "
                  "theirs in the budget stage (--budget-n)", file=sys.stderr)
            return 2
        set_threads(args.threads)
        return _choose_budget(args, not args.no_progress, tqdm.write)
    if args.ship and mode == "shipped":
        print("visor reproduce: --ship copies what --train (or --quick) produced; add --train", file=sys.stderr)
        return 2
    if args.nproc < 1 or (args.nproc > 1 and mode == "shipped"):
        print("visor reproduce: --nproc must be at least 1, and only trains (--train or --quick)", file=sys.stderr)
        return 2
    if args.reuse_from and mode == "shipped":
        print("visor reproduce: --reuse-from links trained stages for --train or --quick", file=sys.stderr)
        return 2
    if mode == "shipped" and (args.router != "label" or args.label_n is not None or args.budget_n is not None):
        print("visor reproduce: --router, --label-n and --budget-n set how --train or --quick makes the router",
              file=sys.stderr)
        return 2
    if args.router == "score" and args.resolutions:
        print("visor reproduce: a score router chooses SA configurations only; --resolutions needs --router label",
              file=sys.stderr)
        return 2
    if args.baseline and mode == "shipped":
        print("visor reproduce: --baseline gives --train or --quick the baseline to build VISOR on", file=sys.stderr)
        return 2
    if args.universal and (mode == "shipped" or not args.baseline or args.resolutions):
        print("visor reproduce: --universal gives --train or --quick the universal model to route, with the --baseline "
              "it was built on (and its own viable set: no --resolutions)", file=sys.stderr)
        return 2
    if args.baseline:
        from visor.reproduce.presets import read_baseline_recipe, read_universal_recipe

        try:
            read_baseline_recipe(Path(args.baseline))
            if args.universal:
                read_universal_recipe(Path(args.universal))
        except (FileNotFoundError, ValueError) as err:
            print(f"visor reproduce: {err}", file=sys.stderr)
            return 2
    if args.n is not None and args.n < 1:
        print("visor reproduce: --n must be at least 1", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir or ("runs/reproduce-quick" if mode == "quick" else "runs/reproduce"))
    out = Path(args.out or ("results/reproduce-quick" if mode == "quick" else "results/reproduce"))
    set_threads(args.threads)
    progress = not args.no_progress
    log = tqdm.write
    if mode == "shipped":
        data = _shipped(args, work_dir, progress, log)
        if data is None:
            return 2
    else:
        data = _trained(args, mode, work_dir, progress, log)
        if data is None:
            return 130
    return _finish(data, out, mode)


def _replot(folder: Path) -> int:
    import json

    from visor.reproduce.report import format_table, write_reports

    source = folder / "reproduce.json"
    if not source.is_file():
        print(f"visor reproduce --replot: {source} not found (a results folder of `visor reproduce` has it)",
              file=sys.stderr)
        return 2
    data = json.loads(source.read_text())
    written = data.get("targets")
    paths = write_reports(data, folder)  # checks the targets again (the code may have added to them)
    if json.loads(json.dumps(data["targets"], default=str)) != written:  # keep the JSON's targets those reported
        source.write_text(json.dumps(data, indent=2, default=str))
        paths = {"json": source, **paths}
    print(format_table(data["rows"]))
    print(f"\nrewritten from {source}: {', '.join(str(p) for p in paths.values())}")
    return 0


def _status(work_dir: Path) -> int:
    from dataclasses import asdict

    from visor.cli.common import print_json_line
    from visor.reproduce.status import format_status, work_dir_status

    try:
        stages = work_dir_status(work_dir)
    except FileNotFoundError as err:
        print(f"visor reproduce --status: {err}", file=sys.stderr)
        return 2
    print(f"{work_dir}:")
    print(format_status(stages))
    print_json_line({"work_dir": str(work_dir), "stages": [asdict(s) for s in stages]})
    return 0


def _add_tr(args) -> int:
    from visor.reproduce.shipped import ShippedCheckpointsError, add_visor_tr, default_folder
    from visor.reproduce.stages import git_commit

    folder = Path(args.checkpoints) if args.checkpoints else default_folder()
    try:
        target = add_visor_tr(folder, Path(args.add_tr), commit=git_commit())
    except ShippedCheckpointsError as err:
        print(f"visor reproduce: {err}", file=sys.stderr)
        return 2
    print(f"added the VISOR-TR model {args.add_tr} to {folder} as {target.name}/ (manifest updated)")
    print_json_line({"checkpoints": str(folder), "visor_tr": str(target)})
    return 0


def _shipped(args, work_dir: Path, progress: bool, log):
    from visor.reproduce.pipeline import evaluate_checkpoints, eval_spec_for
    from visor.reproduce.presets import preset_from_settings
    from visor.reproduce.shipped import ShippedCheckpointsError, load_shipped
    from visor.reproduce.stages import StageCache, git_commit

    try:
        shipped = load_shipped(args.checkpoints)
    except ShippedCheckpointsError as err:
        print(f"visor reproduce: {err}", file=sys.stderr)
        return None
    preset = preset_from_settings(shipped.pipeline, shipped.recipes)
    _set_precision(preset, args.precision, log)
    spec = eval_spec_for(preset, n=args.n, seed=args.seed, timing=not args.no_timing,
                         selector_positions=args.selector_positions)
    ids = shipped.model_ids
    cache = StageCache(work_dir / f"shipped-{ids['visor'][:12]}", set(args.force), log)
    log(f"shipped checkpoints {shipped.folder} (preset {shipped.manifest.get('preset')}, commit {shipped.manifest['commit']})")
    data = evaluate_checkpoints(cache, shipped.base, shipped.visor, ids, spec, progress=progress, log=log,
                                visor_tr=shipped.visor_tr)
    notes = list(preset.notes)
    if shipped.visor_tr is None:
        notes.append("these shipped checkpoints have no VISOR-TR model: the VISOR-TR rows run the universal model on "
                     "pooled tokens it never trained on")
    if shipped.manifest.get("preset") == "quick":
        notes.append("these shipped checkpoints come from the --quick preset: the numbers are meaningless")
    data["meta"]["provenance"] = {"mode": "shipped", "preset": shipped.manifest.get("preset"), "commit": git_commit(),
                                  "checkpoints": str(shipped.folder), "checkpoints_commit": shipped.manifest["commit"],
                                  "checkpoints_command": shipped.manifest.get("command"), "notes": notes}
    if shipped.pipeline.get("route_budget_choice"):
        data["meta"]["budget_choice"] = shipped.pipeline["route_budget_choice"]
    return data


def _choose_budget(args, progress: bool, log) -> int:
    import dataclasses

    from visor.reproduce.pipeline import choose_route_budget
    from visor.reproduce.presets import full_preset, preset_from_settings, quick_preset
    from visor.reproduce.shipped import ShippedCheckpointsError, load_shipped, record_budget
    from visor.reproduce.stages import git_commit
    from visor.routing.budget import describe

    try:
        shipped = load_shipped(args.checkpoints)
    except ShippedCheckpointsError as err:
        print(f"visor reproduce: {err}", file=sys.stderr)
        return 2
    preset = preset_from_settings(shipped.pipeline, shipped.recipes)
    if not preset.budget_candidates:
        print(f"visor reproduce: {shipped.folder} records no budget candidates to choose from", file=sys.stderr)
        return 2
    current = quick_preset() if shipped.manifest.get("preset") == "quick" else full_preset()
    preset = dataclasses.replace(preset, budget_n=args.budget_n or current.budget_n)
    _set_precision(preset, args.precision, log)
    ids = shipped.model_ids
    work = Path(args.work_dir or "runs/reproduce") / f"shipped-{ids['visor'][:12]}" / f"budget-n{preset.budget_n}"
    work.mkdir(parents=True, exist_ok=True)
    log(f"choosing the router budget of {shipped.folder} on {preset.budget_n} validation items "
        f"(candidates {list(preset.budget_candidates)}, {preset.precision}); was {shipped.pipeline.get('route_budget')}")
    choice = choose_route_budget(shipped.visor, preset, work, progress=progress)
    record = record_budget(shipped.folder, choice, preset.budget_n, commit=git_commit())
    print(f"{describe(choice)}\nrecorded in {shipped.folder}: route budget {record['previous']} -> {record['budget']} "
          f"(route report in {work / 'report'})")
    return 0


def _set_precision(preset, precision: str | None, log) -> None:
    """The preset's evaluation precision from ``--precision`` (``auto`` when not given), resolved for this machine."""
    from visor.precision import resolve_precision

    preset.precision = resolve_precision(precision or "auto")
    log(f"precision: {preset.precision}" + (" (auto: this CPU's bf16 speed decides)" if not precision or precision == "auto" else ""))


def _trained(args, mode: str, work_dir: Path, progress: bool, log):
    from visor.reproduce.pipeline import evaluate_checkpoints, eval_spec_for, train_all
    from visor.reproduce.presets import full_preset, quick_preset
    from visor.reproduce.shipped import default_folder, ship
    from visor.reproduce.stages import StageCache, StageInterrupted

    preset = quick_preset() if mode == "quick" else full_preset(args.recipes)
    if getattr(args, "baseline", None):
        preset = preset.with_baseline(args.baseline)
    if getattr(args, "universal", None):
        preset = preset.with_universal(args.universal)
    if getattr(args, "resolutions", None):
        preset.configs_resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    preset = preset.with_router_objective(getattr(args, "router", "label"))
    for name in ("label_n", "budget_n"):
        if getattr(args, name, None) is not None:
            setattr(preset, name, getattr(args, name))
    if mode != "quick" or args.precision:
        _set_precision(preset, args.precision, log)
    cache = StageCache(work_dir, set(args.force), log, reuse_from=getattr(args, "reuse_from", None))
    log(f"visor reproduce --{mode}: stages under {work_dir}")
    try:
        trained = train_all(preset, cache, progress=progress, log=log, nproc=args.nproc)
    except (StageInterrupted, KeyboardInterrupt) as err:
        print(f"visor reproduce: interrupted ({err or 'Ctrl-C'}); run the same command again to resume", file=sys.stderr)
        return None
    spec = eval_spec_for(preset, n=args.n, seed=args.seed, timing=not args.no_timing, route_budget=trained.route_budget,
                         selector_positions=args.selector_positions)
    baseline = trained.stages[preset.baseline_stage()]  # the run whose output is the baseline
    ids = {"base": baseline.output_id, "visor": trained.stages["router"].output_id}
    if trained.visor_tr is not None:
        ids["visor_tr"] = trained.stages["tr"].output_id
    data = evaluate_checkpoints(cache, trained.base, trained.visor, ids, spec, progress=progress, log=log,
                                visor_tr=trained.visor_tr)
    stages = {name: {"key": s.key, "output_id": s.output_id, "seconds": s.seconds, "cached": s.cached}
              for name, s in trained.stages.items()}
    data["meta"]["provenance"] = {"mode": mode, "preset": preset.name, "commit": cache.commit, "work_dir": str(work_dir),
                                  "stages": stages, "notes": list(preset.notes)}
    if trained.budget_choice is not None:
        data["meta"]["budget_choice"] = trained.budget_choice
    if args.ship:
        folder = Path(args.checkpoints) if args.checkpoints else default_folder()
        # the shipped settings carry the budget the routed rows ran at (a number: plain `visor reproduce` has no
        # validation stage), and how it was chosen
        pipeline = {**preset.stage_settings(), "route_budget": trained.route_budget,
                    "stage_seconds": {k: v["seconds"] for k, v in stages.items()}}
        if trained.budget_choice is not None:
            pipeline["route_budget_choice"] = trained.budget_choice
        ship(folder, trained.base, trained.visor, trained.recipes, pipeline, preset=preset.name, commit=cache.commit,
             stages=stages, dtype=args.ship_dtype, visor_tr=trained.visor_tr)
        data["meta"]["provenance"]["shipped_to"] = str(folder)
        log(f"shipped the base and VISOR checkpoints{' (and VISOR-TR)' if trained.visor_tr else ''} with their recipes "
            f"and manifest to {folder}")
    return data


def _finish(data: dict, out: Path, mode: str) -> int:
    from visor.reproduce.report import format_table, write_results

    paths = write_results(data, out, data.get("runner"))
    print()
    print(format_table(data["rows"]))
    print()
    for t in data.get("targets", []):
        print(f"  [{'x' if t['holds'] else ' '}] {t['target']}: {t['value']}")
    print(f"\nresults: {', '.join(str(p) for p in paths.values())}")
    summary = {r["key"]: {"easy": r["easy_mean"], "hard": r["hard_mean"], "flops_reduction": r["flops_reduction"],
                          "projected_reduction": r["projected_reduction"], "prefill_speedup": r["prefill_speedup"]}
               for r in data["rows"] if r["in_table"]}
    print_json_line({"mode": mode, "out": str(out), "n_items": data["meta"]["n_items"], "rows": summary})
    return 0
