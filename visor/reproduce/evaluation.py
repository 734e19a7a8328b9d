"""Evaluate every method of the comparison on one freshly generated test split and build the table rows.

Order (each method's evaluation is its own cached stage, ``eval/<method>/``): the baseline, the universal
model at every number of SA slots, VISOR routed (whose mean FLOPs set the compressors' target), pooling,
the matched compressors (``visor.reproduce.methods``), VISOR with token reduction; then the prefill timing
(``timing/``). A row's numbers come from its per-item predictions only: means per family and difficulty
(``visor.eval.graders.aggregate``), mean LLM FLOPs (the harness's per-item cost), the 0.5B projection of
the same per-item decisions (``visor.reproduce.projection``) and the measured prefill time; next to the LLM-only
FLOPs, the same end to end (vision tower + projector + LLM: ``mean_total_flops``, ``projected_total_flops``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from visor.precision import autocast as _autocast
from visor.reproduce import methods as M
from visor.reproduce.stages import StageCache, digest


@dataclass
class EvalSpec:
    n: int = 200
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 16
    precision: str = "bf16"
    timing_items: int = 4
    timing_repeats: int = 5
    timing: bool = True
    synth: dict = field(default_factory=dict)  # {"image_size": px} of the training data (SynthConfig.with_image_size)
    route_budget: float = 0.0  # router budget of the routed rows
    # "original": the pre-LLM selectors' rows keep the kept tokens' full-prompt positions (``NAME:AMOUNT@original``)
    # instead of the methods' renumbering; the rows' reducer specs carry it, so it stays out of the key
    selector_positions: str = "contiguous"

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k not in ("timing_items", "timing_repeats", "timing", "selector_positions")}


@dataclass
class Loaded:
    model: object
    tokenizer: object
    image_processor: object
    kind: str
    folder: Path


def load_model(folder: str | Path) -> Loaded:
    from visor.convert.llava_onevision import load_checkpoint
    from visor.data.tokenizer import load_tokenizer
    from visor.train.models import image_processor_for

    model, kind = load_checkpoint(folder)
    model = model.float()  # weights may be shipped in bf16; evaluation precision is the autocast's
    tokenizer = load_tokenizer(folder)
    return Loaded(model, tokenizer, image_processor_for(model.config), kind, Path(folder))


def test_items(spec: EvalSpec):
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.eval.harness import synth_items

    config = DEFAULT_CONFIG.with_image_size(spec.synth.get("image_size"))
    return synth_items("test", spec.n, seed=spec.seed, config=config)


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MethodRunner:
    """Evaluates methods through the stage cache (one folder per method, deduplicated by spec)."""

    def __init__(self, cache: StageCache, models: dict[str, Loaded], model_ids: dict[str, str], items, spec: EvalSpec,
                 progress: bool, log: Callable[[str], None]) -> None:
        self.cache, self.models, self.model_ids, self.items, self.spec = cache, models, model_ids, items, spec
        self.progress, self.log = progress, log
        self.by_spec: dict[str, dict] = {}
        self.results: dict[str, dict] = {}  # method key -> {"method", "predictions", "folder", "cached", "seconds"}

    def run(self, method: M.Method) -> list[dict]:
        from visor.eval.harness import evaluate

        spec = {"method": method.spec(), "model": self.model_ids[method.model], "eval": self.spec.key()}
        spec_id = digest(spec)
        if spec_id in self.by_spec:  # the same run under another row name (e.g. 2 SA == maximal)
            done = self.by_spec[spec_id]
            self.results[method.key] = {**done, "method": method}
            return done["predictions"]
        loaded = self.models[method.model]

        def body(folder: Path) -> dict:
            kwargs = {"generate_kwargs": {"reducer": method.reducer}} if method.reducer else {}
            if method.route:
                kwargs.update(route=True, budget=self.spec.route_budget)
            else:
                kwargs.update(active_sa=method.active_sa)
            with _autocast(self.spec.precision):
                result = evaluate(loaded.model, loaded.tokenizer, loaded.image_processor, self.items,
                                  batch_size=self.spec.batch_size, max_new_tokens=self.spec.max_new_tokens,
                                  progress=self.progress, **kwargs)
            result.write(folder)
            return {"predictions": "predictions.jsonl", "summary": "summary.json"}

        stage = self.cache.run(f"eval {method.key}", f"eval/{method.key}", spec, {}, body)
        predictions = read_predictions(stage.path("predictions"))
        state = "cached" if stage.cached else f"{stage.seconds:.0f}s"
        summary = json.loads(stage.path("summary").read_text())
        self.log(f"  {method.label:<22} easy {_pct(summary.get('easy_mean'))}  hard {_pct(summary.get('hard_mean'))}"
                 f"  ({state})")
        done = {"method": method, "predictions": predictions, "folder": stage.folder, "cached": stage.cached,
                "seconds": stage.seconds}
        self.by_spec[spec_id] = done
        self.results[method.key] = done
        return predictions


def _pct(value) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def mean_flops(predictions: list[dict]) -> float | None:
    ran = [p["llm_flops"] for p in predictions if p.get("llm_flops") is not None]
    return sum(ran) / len(ran) if ran else None


def mean_total_flops(predictions: list[dict]) -> float | None:
    """Mean end-to-end FLOPs (LLM + vision tower and projector) over the items that ran."""
    ran = [p["llm_flops"] + (p.get("vision_flops") or 0.0) for p in predictions if p.get("llm_flops") is not None]
    return sum(ran) / len(ran) if ran else None


def run_all(cache: StageCache, base_dir: Path, visor_dir: Path, model_ids: dict[str, str], spec: EvalSpec, *,
            progress: bool = True, log: Callable[[str], None] = print, visor_tr_dir: Path | None = None) -> dict:
    """Evaluate every method (cached), match budgets, time prefill; returns the report data (rows + meta).
    ``visor_tr_dir``: a VISOR-TR model (the routed model fine-tuned on reduced tokens) for the VISOR-TR rows;
    without one they run the universal model on reduced tokens it never trained on."""
    models = {"base": load_model(base_dir), "visor": load_model(visor_dir)}
    if visor_tr_dir is not None:
        models["visor_tr"] = load_model(visor_tr_dir)
    if models["base"].model.plan.cross_attention_layers:
        raise ValueError(f"{base_dir} is a VISOR checkpoint; the baseline must be a LLaVA-OneVision checkpoint")
    visor = models["visor"].model
    for key, folder in (("visor", visor_dir), ("visor_tr", visor_tr_dir)):
        if key in models and not getattr(models[key].model.config, "router", None):
            raise ValueError(f"{folder} has no router: train one (`visor route train`) before reproducing the table")
    items = test_items(spec)
    log(f"test split: {len(items)} items (seed {spec.seed}), evaluating every method")
    runner = MethodRunner(cache, models, model_ids, items, spec, progress, log)
    fixed, pooled = M.visor_fixed_methods(visor.plan), M.fixed_compression_methods()
    routed = M.with_selector_positions(M.routed_methods(spec.route_budget, tr_model="visor_tr" in models),
                                       spec.selector_positions)
    bar = tqdm(total=len(fixed) + len(routed) + len(pooled) + len(M.MATCHED_REDUCERS), desc="methods", unit="method",
               disable=not progress)

    def run(method: M.Method) -> list[dict]:
        bar.set_postfix_str(method.label)
        predictions = runner.run(method)
        bar.update(1)
        return predictions

    run(pooled[0])  # the baseline
    for method in fixed:
        run(method)
    target = mean_flops(run(routed[0]))  # VISOR routed sets the compressors' FLOPs target
    for method in pooled[1:]:
        run(method)
    profile = M.token_profile(items, runner.results["baseline"]["predictions"])
    for name in M.MATCHED_REDUCERS:
        matched = M.matched_method(name, M.match_budget(models["base"].model, name, profile, target))
        run(M.with_selector_positions([matched], spec.selector_positions)[0])
    for method in routed[1:]:
        run(method)
    bar.close()

    all_methods = [m["method"] for m in runner.results.values()]
    timing = None
    if spec.timing:
        timing = _timing(cache, models, model_ids, items, spec, runner, progress, log)
    rows = build_rows(runner, models, timing)
    meta = {
        "eval": asdict(spec), "n_items": len(items), "target_flops": target,
        "models": {k: str(v.folder) for k, v in models.items()}, "model_ids": model_ids,
        "viable_configs": visor.config.viable_configs, "router": visor.config.router,
        "plan": visor.plan.describe(), "slot_order": list(visor.plan.slot_order),
        "methods": [m.to_dict() for m in all_methods],
    }
    from visor.reproduce.projection import PROJECTION

    meta["projection"] = PROJECTION
    return {"rows": rows, "meta": meta, "runner": runner}


def _timing(cache, models, model_ids, items, spec: EvalSpec, runner: MethodRunner, progress, log) -> dict:
    from visor.reproduce import timing as T

    methods = [r["method"] for r in runner.results.values()]
    router_configs = models["visor"].model.config.router["configs"]
    chosen = {key: T.chosen_layouts(r["predictions"]) for key, r in runner.results.items() if r["method"].route}
    timing_spec = {"methods": sorted({json.dumps(m.spec(), sort_keys=True) for m in methods}), "models": model_ids,
                   "items": spec.timing_items, "repeats": spec.timing_repeats, "precision": spec.precision,
                   "eval": spec.key(),
                   "chosen": {k: sorted(([r, list(c)], n) for (r, c), n in v.items()) for k, v in chosen.items()}}

    def body(folder: Path) -> dict:
        measured = T.measure({k: v.model for k, v in models.items()}, {k: v.tokenizer for k, v in models.items()},
                             {k: v.image_processor for k, v in models.items()}, items[: spec.timing_items], methods,
                             router_configs, repeats=spec.timing_repeats, precision=spec.precision, progress=progress)
        seconds = {m.key: T.method_seconds(m, measured, chosen.get(m.key)) for m in methods}
        e2e = {m.key: T.method_seconds(m, measured, chosen.get(m.key), end_to_end=True) for m in methods}
        data = {"method_seconds": seconds, "method_seconds_e2e": e2e, "items": measured["items"],
                "repeats": measured["repeats"],
                "atoms": [{"model": a[0], "config": a[1] if a[1] is None or isinstance(a[1], str) else list(a[1]),
                           "reducer": a[2], "layout": a[3], "seconds": s} for a, s in measured["atoms"].items()],
                "selection": [{"model": k[0], "reducer": k[1], "seconds": s} for k, s in measured["selection"].items()]}
        (folder / "timing.json").write_text(json.dumps(data, indent=2))
        return {"timing": "timing.json"}

    stage = cache.run("timing", "timing", timing_spec, {}, body)
    log(f"prefill timing: {'cached' if stage.cached else f'{stage.seconds:.0f}s'}")
    return json.loads(stage.path("timing").read_text())


def build_rows(runner: MethodRunner, models: dict[str, Loaded], timing: dict | None) -> list[dict]:
    from visor.reproduce.projection import baseline_flops

    router = models["visor"].model.config.router
    base_flops = mean_flops(runner.results["baseline"]["predictions"])
    base_total = mean_total_flops(runner.results["baseline"]["predictions"])
    seconds = (timing or {}).get("method_seconds", {})
    e2e = (timing or {}).get("method_seconds_e2e", {})
    rows = [row_from_predictions(result["method"], result["predictions"], base_flops=base_flops,
                                 base_projected=baseline_flops(), router=router, seconds=seconds.get(key),
                                 base_seconds=seconds.get("baseline"), base_total=base_total,
                                 e2e_seconds=e2e.get(key), base_e2e_seconds=e2e.get("baseline"))
            for key, result in runner.results.items()]
    base_visual = _mean([p.get("visual_tokens") for p in runner.results["baseline"]["predictions"]])
    for row in rows:
        row["token_reduction"] = token_reduction(row["reducer"], models[row["model"]].model.plan.num_layers, base_visual)
    order = {k: i for i, k in enumerate(M.TABLE_ORDER)}
    rows.sort(key=lambda r: (order.get(r["key"], len(order)), r["key"]))
    return rows


def token_reduction(reducer: str | None, num_layers: int, n_visual: float | None) -> float:
    """How many times fewer visual tokens a reducer leaves: ``1 / keep`` before the LLM (the nominal budget,
    newline tokens aside), the layer-averaged count for FastV/PyramidDrop; 1 without a reducer."""
    if not reducer or not n_visual:
        return 1.0
    from visor.compression import build_reducer

    r = build_reducer(reducer)
    if r.stage == "pre_llm":
        return 1.0 / r.keep
    per_layer = r.visual_tokens_per_layer(num_layers, int(round(n_visual)))
    return num_layers * n_visual / max(sum(per_layer), 1)


def row_from_predictions(method: M.Method, preds: list[dict], *, base_flops: float | None, base_projected: float,
                         router: dict | None, seconds: float | None = None, base_seconds: float | None = None,
                         base_total: float | None = None, e2e_seconds: float | None = None,
                         base_e2e_seconds: float | None = None) -> dict:
    """One table row, computed from the method's per-item predictions only (module docstring)."""
    from visor.eval.graders import aggregate
    from visor.reproduce.projection import baseline_total_flops, method_projection, method_total_projection
    from visor.reproduce.timing import chosen_configs

    summary = aggregate([{"family": p["family"], "difficulty": p["difficulty"], "score": p["score"]} for p in preds])
    flops = mean_flops(preds)
    projected = method_projection(method.model, method.reducer, method.route, router, [p.get("active_sa") for p in preds])
    chosen = chosen_configs(preds) if method.route else None
    total = mean_total_flops(preds)
    resolutions = [p.get("resolution") for p in preds if p.get("llm_flops") is not None]
    if "base" in resolutions:  # some items ran on the base view only (visor.model.resolution): fewer LLM tokens too
        projected = method_total_projection(method.model, method.reducer, method.route, router,
                                            [p.get("active_sa") for p in preds], [p.get("resolution") for p in preds],
                                            llm_only=True)
    projected_total = method_total_projection(method.model, method.reducer, method.route, router,
                                              [p.get("active_sa") for p in preds], [p.get("resolution") for p in preds])
    end_to_end = {
        "mean_total_flops": total, "total_flops_reduction": (base_total / total) if (total and base_total) else None,
        "projected_total_flops": projected_total,
        "projected_total_reduction": baseline_total_flops() / projected_total if projected_total else None,
        "base_only_share": (sum(r == "base" for r in resolutions) / len(resolutions)) if resolutions else None,
    }
    row = {
        "key": method.key, "method": method.label, "group": method.group, "budget": method.budget,
        "in_table": method.in_table, "model": method.model, "reducer": method.reducer, "route": method.route,
        "active_sa": None if method.active_sa is None else list(method.active_sa),
        "easy_mean": summary["easy_mean"], "hard_mean": summary["hard_mean"], "overall_mean": summary["overall_mean"],
        "per_family": summary["per_family"], "n_items": summary["n_items"], "n_skipped": summary["n_skipped"],
        "mean_flops": flops, "flops_reduction": (base_flops / flops) if (flops and base_flops) else None,
        "projected_flops": projected, "projected_reduction": base_projected / projected if projected else None,
        "prefill_seconds": seconds, "prefill_speedup": (base_seconds / seconds) if (seconds and base_seconds) else None,
        "e2e_seconds": e2e_seconds,
        "e2e_speedup": (base_e2e_seconds / e2e_seconds) if (e2e_seconds and base_e2e_seconds) else None,
        "mean_visual_tokens": _mean([p.get("visual_tokens") for p in preds]),
        "n_sa_mean": _mean([_n_sa(p.get("active_sa")) for p in preds]) if method.model == "visor" else None,
        "chosen": {("none" if not c else "+".join(map(str, c))): n for c, n in sorted(chosen.items())} if chosen else None,
        "matched": method.matched or None,
    }
    row.update(end_to_end)
    if chosen and "base" in resolutions:  # the configurations with their resolution part
        named = Counter(p["active_sa"] if p.get("resolution") != "base" else f"base:{p['active_sa']}"
                        for p in preds if p.get("active_sa") is not None)
        row["chosen"] = dict(sorted(named.items()))
    return row


def _n_sa(active) -> int | None:
    if active is None:
        return None
    return 0 if active == "none" else len(active.split("+"))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
