"""``visor reproduce``: the quick preset end to end (every stage, every output file, the table consistent with
the per-item predictions), shipping and loading checkpoints, the stage cache's skip/resume/invalidate rules."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visor.reproduce.methods import TABLE_ORDER
from visor.reproduce.stages import StageCache, StageInterrupted, digest

ROOT = Path(__file__).resolve().parents[1]
EASY = ("color", "shape", "count", "presence", "side")
HARD = ("code", "doc", "chart", "dots", "handwriting")
LABELS = ["LLaVA-OV baseline", "pooling 2x", "pooling 4x", "VisionZip", "VisPruner", "HiRED", "FastV", "PyramidDrop",
          "VISOR CA-only", "VISOR 2 SA", "VISOR maximal", "VISOR routed", "VISOR-TR 2x", "VISOR-TR 4x", "VISOR + VisionZip"]


def visor_cli(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "visor", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``visor reproduce --quick --ship`` run (about a minute), shared by the tests below."""
    root = tmp_path_factory.mktemp("reproduce")
    result = visor_cli(["reproduce", "--quick", "--ship", "--checkpoints", str(root / "checkpoints"), "--work-dir",
                        str(root / "work"), "--out", str(root / "out"), "--threads", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr[-4000:]
    return {"root": root, "out": root / "out", "stdout": result.stdout, "stderr": result.stderr}


def test_replot_rewrites_the_reports_from_the_json_alone(quick, tmp_path):
    """`visor reproduce --replot DIR` redraws the CSV, Markdown and plots from DIR/reproduce.json: the same CSV
    as the run wrote, predictions untouched, the JSON's targets brought up to those reported (here: an older run's
    JSON that had none), and a clear error for a folder without results."""
    folder = tmp_path / "results"
    shutil.copytree(quick["out"], folder)
    written = (folder / "reproduce.csv").read_text()
    data = json.loads((folder / "reproduce.json").read_text())
    targets = data.pop("targets")
    (folder / "reproduce.json").write_text(json.dumps(data))
    for name in ("reproduce.csv", "reproduce.md", "pareto_easy.png", "pareto_hard.png", "ablation_sa_layers.png"):
        (folder / name).unlink()
    predictions = sorted(p.name for p in (folder / "predictions").iterdir())
    result = visor_cli(["reproduce", "--replot", str(folder)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "reproduce.csv").read_text() == written
    assert all((folder / name).stat().st_size > 0 for name in ("reproduce.md", "pareto_easy.png", "pareto_hard.png",
                                                                "ablation_sa_layers.png"))
    assert sorted(p.name for p in (folder / "predictions").iterdir()) == predictions
    assert json.loads((folder / "reproduce.json").read_text())["targets"] == targets
    assert all(label in result.stdout for label in LABELS)
    missing = visor_cli(["reproduce", "--replot", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "reproduce.json" in missing.stderr


def _mean(values):
    return sum(values) / len(values)


class StopAtStage(Exception):
    """Ends a ``train_all`` run where a test wants it (raised by :func:`stop_at`)."""


def stop_at(stage: str):
    """An ``on_stage`` callback that stops ``train_all`` as it reaches ``stage`` (before running it)."""
    def on_stage(name: str) -> None:
        if name == stage:
            raise StopAtStage(name)
    return on_stage


def test_quick_writes_every_output_with_the_issue_rows_and_columns(quick):
    out = quick["out"]
    for name in ("reproduce.csv", "reproduce.json", "reproduce.md", "pareto_easy.png", "pareto_hard.png",
                 "ablation_sa_layers.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    with open(out / "reproduce.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == LABELS
    assert [r["key"] for r in rows] == list(TABLE_ORDER)
    columns = set(rows[0])
    assert {"easy_mean", "hard_mean", "flops_reduction_tiny", "flops_reduction_0.5b_7290", "prefill_speedup", "budget"} <= columns
    assert {f"family_{f}" for f in EASY + HARD} <= columns
    for row in rows:  # every cell is filled
        assert all(row[c] not in ("", "None") for c in columns), row
    # the terminal table shows every row and the column heads
    for label in LABELS:
        assert label in quick["stdout"]
    assert "FLOPs" in quick["stdout"] and "@7290" in quick["stdout"] and "handwr" in quick["stdout"]
    markdown = (out / "reproduce.md").read_text()
    assert "## Targets" in markdown and all(label in markdown for label in LABELS)


def test_routed_rows_run_at_the_presets_router_budget_and_it_keys_their_cache():
    from visor.reproduce.pipeline import eval_spec_for
    from visor.reproduce.presets import full_preset, quick_preset

    full, quick = full_preset(), quick_preset()
    assert full.label_score == "loglik" and full.route_budget == quick.route_budget == "auto"
    with pytest.raises(ValueError, match="budget stage"):  # the choice must come from the validation stage
        eval_spec_for(full)
    assert eval_spec_for(full, route_budget=-1.0).route_budget == -1.0
    fixed = full_preset().__class__(**{**vars(full), "route_budget": 0.5})
    assert eval_spec_for(fixed).route_budget == 0.5
    # a changed budget is a different evaluation: its cached predictions are not reused
    assert eval_spec_for(full, route_budget=-1.0).key() != eval_spec_for(full, route_budget=0.0).key()
    # the table says which budget the routed rows ran at; the budget text is not part of a method's cache key
    from visor.reproduce.methods import routed_methods

    assert [m.budget for m in routed_methods(-1.0)][:2] == ["router (budget -1)", "router + pooling 2x (budget -1)"]
    assert routed_methods(0.0)[0].budget == "router"
    assert [m.spec() for m in routed_methods(-1.0)] == [m.spec() for m in routed_methods(0.0)]


def test_router_stage_keeps_the_recipe_so_the_clis_use_the_trained_canvas(quick):
    work = quick["root"] / "work"
    stage2 = work / "5-stage2" / "run" / "final"
    assert (work / "7-router" / "model" / "recipe.json").read_text() == (stage2 / "recipe.json").read_text()


def test_quick_numbers_follow_from_the_per_item_predictions(quick):
    out = quick["out"]
    data = json.loads((out / "reproduce.json").read_text())
    with open(out / "reproduce.csv") as handle:
        table = {r["key"]: r for r in csv.DictReader(handle)}
    preds = {key: [json.loads(line) for line in (out / "predictions" / f"{key}.jsonl").read_text().splitlines()]
             for key in table}
    base_flops = _mean([p["llm_flops"] for p in preds["baseline"]])
    for key, row in table.items():
        items = preds[key]
        assert len(items) == data["meta"]["n_items"] == int(row["n_items"]) == 20
        fam = {f: _mean([p["score"] or 0.0 for p in items if p["family"] == f]) for f in EASY + HARD}
        for f in EASY + HARD:
            assert float(row[f"family_{f}"]) == pytest.approx(fam[f])
        assert float(row["easy_mean"]) == pytest.approx(_mean([fam[f] for f in EASY]))
        assert float(row["hard_mean"]) == pytest.approx(_mean([fam[f] for f in HARD]))
        flops = _mean([p["llm_flops"] for p in items])
        assert float(row["mean_llm_flops_tiny"]) == pytest.approx(flops)
        assert float(row["flops_reduction_tiny"]) == pytest.approx(base_flops / flops)
    rows = {r["key"]: r for r in data["rows"]}
    # fixed VISOR rows ran the configuration they claim; routed rows record the router's choices
    assert {p["active_sa"] for p in preds["visor-ca-only"]} == {"none"}
    assert {p["active_sa"] for p in preds["visor-maximal"]} == {"0+1+2"}
    assert sum(rows["visor-routed"]["chosen"].values()) == 20
    # the VISOR-TR rows ran the tr stage's model (fine-tuned on pooled tokens), the other routed rows the universal one
    assert {rows[k]["model"] for k in ("visor-tr-2x", "visor-tr-4x")} == {"visor_tr"}
    assert rows["visor-tr-2x"]["budget"].startswith("VISOR-TR model: router + pooling 2x")
    assert {rows[k]["model"] for k in ("visor-routed", "visor-visionzip")} == {"visor"}
    assert data["meta"]["models"]["visor_tr"].endswith("9-tr/run/final")
    # every compressor's budget: matched within 20% of routed, or its strongest setting (and said so)
    target = data["meta"]["target_flops"]
    assert target == pytest.approx(rows["visor-routed"]["mean_flops"])
    for key in ("visionzip", "vispruner", "hired", "fastv", "pdrop"):
        match = rows[key]["matched"]
        assert match["within_tolerance"] or match["strongest"]
        assert ("strongest" in rows[key]["budget"]) == match["strongest"]
        assert rows[key]["mean_flops"] == pytest.approx(match["flops"], rel=1e-6)  # the analytic match is what ran
    # the ablation covers every number of SA slots, cheaper with fewer
    ablation = sorted((len(r["active_sa"]), r["mean_flops"]) for r in data["rows"]
                      if r["model"] == "visor" and not r["route"] and not r["reducer"])
    assert [k for k, _ in ablation][:1] == [0] and {k for k, _ in ablation} == {0, 1, 2, 3}
    assert [f for _, f in sorted(set(ablation))] == sorted(f for _, f in set(ablation))
    assert rows["baseline"]["projected_reduction"] == pytest.approx(1.0)
    assert rows["visor-ca-only"]["projected_reduction"] > rows["visor-maximal"]["projected_reduction"] > 1


def test_shipped_checkpoints_load_and_their_recipes_parse(quick):
    from visor.reproduce.shipped import load_shipped
    from visor.train.recipe import Recipe

    shipped = load_shipped(quick["root"] / "checkpoints")
    manifest = shipped.manifest
    assert manifest["preset"] == "quick" and manifest["commit"] and "reproduce" in manifest["command"]
    assert {k: r.kind for k, r in shipped.recipes.items()} == {
        "vision": "vision", "base": "base", "focus": "base", "stage1": "visor-stage1", "stage2": "visor-stage2",
        "tr": "visor-stage2"}
    # VISOR-TR: the routed model fine-tuned on pooled tokens, shipped beside it with its router
    assert shipped.recipes["tr"].reducers == ["pooling:2x", "pooling:4x"]
    assert shipped.recipes["tr"].init.endswith("7-router/model")
    assert manifest["checkpoints"]["visor_tr"] == {"path": "visor-tr", "kind": "visor", "recipe": "recipes/tr.yaml",
                                                   "router": True, "reducers": ["pooling:2x", "pooling:4x"]}
    assert shipped.visor_tr == shipped.folder / "visor-tr" and set(shipped.model_ids) == {"base", "visor", "visor_tr"}
    # the baseline is the focus run, which continued the base run; VISOR was built from it
    assert manifest["checkpoints"]["base"]["recipe"] == "recipes/focus.yaml"
    assert shipped.recipes["focus"].init.endswith("2-base/run/final")
    assert shipped.recipes["focus"].data.family_weights == {"code": 2, "doc": 2}
    assert shipped.recipes["stage1"].init.endswith("2b-focus/run/final")
    assert all(isinstance(r, Recipe) for r in shipped.recipes.values())
    assert shipped.pipeline["eval_n"] == 20 and shipped.pipeline["label_threshold"] == 0.99
    # the router budget was chosen on validation items (the budget stage) and shipped as the number it chose
    choice = json.loads((quick["root"] / "work" / "8-budget" / "budget.json").read_text())
    assert choice["budget"] in (0.0, -1.0) and [c["budget"] for c in choice["candidates"]] == [0.0, -1.0]
    assert shipped.pipeline["route_budget"] == choice["budget"] and shipped.pipeline["route_budget_choice"] == choice
    report = json.loads((quick["out"] / "reproduce.json").read_text())
    assert report["meta"]["budget_choice"] == choice and report["meta"]["eval"]["route_budget"] == choice["budget"]
    assert "chosen on the validation split" in (quick["out"] / "reproduce.md").read_text()
    assert manifest["checkpoints"]["visor"]["router"] is True
    assert (shipped.base / "model.safetensors").exists() and (shipped.visor / "model.safetensors").exists()
    assert json.loads((shipped.base / "config.json").read_text())["model_type"] == "llava_onevision"


def test_the_repositorys_shipped_checkpoints_verify_load_and_answer():
    """``checkpoints/`` (what plain ``visor reproduce`` evaluates): the manifest's hashes hold, the recipes parse
    (the baseline's provenance chain included), both models load on the trained canvas and answer benchmark items."""
    import torch

    from visor.cli.common import trained_canvas
    from visor.data.synth.config import SynthConfig
    from visor.eval.harness import evaluate, synth_items
    from visor.reproduce.evaluation import load_model
    from visor.reproduce.shipped import load_shipped
    from visor.train.recipe import Recipe

    shipped = load_shipped(ROOT / "checkpoints")  # verify=True: every file's sha256 against MANIFEST.json
    assert shipped.manifest["preset"] == "full" and shipped.manifest["dtype"] == "bf16"
    assert all(isinstance(r, Recipe) for r in shipped.recipes.values())
    # built on a given baseline (focus4 <- focus3 <- ..., visor reproduce --train --baseline) and a given universal
    # model (--universal: stage 2 continued from the focus4 candidate set's): their recipes and their ancestors'
    assert {"baseline", "baseline-init-1", "universal", "universal-init-1", "universal-init-2"} <= set(shipped.recipes)
    assert shipped.recipes["baseline"].vision_shape_weight > 0  # focus4, with the tower's shape head
    # the universal model is what the repository's stage-2 and stage-2 continuation (stage2b) recipes train
    for name, recipe in (("universal", "visor-stage2-continue-tiny.yaml"), ("universal-init-1", "visor-stage2-tiny.yaml")):
        repo = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
        assert shipped.recipes[name].kind == "visor-stage2" and shipped.recipes[name].max_steps == repo["max_steps"]
        assert shipped.recipes[name].data.seed == (repo.get("data") or {}).get("seed", 0)
    assert shipped.recipes["universal-init-2"].kind == "visor-stage1"
    assert shipped.pipeline["label_score"] == "loglik"
    assert isinstance(shipped.pipeline["route_budget"], float)  # a number: plain `visor reproduce` has no validation stage
    canvas = trained_canvas(shipped.visor)
    assert canvas == trained_canvas(shipped.base) == 128
    items = synth_items("test", 10, seed=0, config=SynthConfig().with_image_size(canvas))
    # VISOR-TR, added with `visor reproduce --add-tr`: fine-tuned from this set's universal model on pooled tokens
    assert shipped.visor_tr is not None and shipped.recipes["tr"].reducers == ["pooling:2x", "pooling:4x"]
    assert trained_canvas(shipped.visor_tr) == 128
    routed = {"route": True}
    for name, kwargs in (("base", {}), ("visor", routed), ("visor_tr", {**routed, "generate_kwargs": {"reducer": "pooling:2x"}})):
        loaded = load_model(getattr(shipped, name))
        assert loaded.kind == ("llava_onevision" if name == "base" else "visor")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = evaluate(loaded.model, loaded.tokenizer, loaded.image_processor, items, batch_size=10,
                              max_new_tokens=4, progress=False, **kwargs)
        assert result.summary["n_items"] == 10 and result.summary["overall_mean"] > 0  # trained, not random


def test_plain_reproduce_evaluates_the_shipped_checkpoints(quick, tmp_path):
    root = quick["root"]
    result = visor_cli(["reproduce", "--checkpoints", str(root / "checkpoints"), "--work-dir", str(tmp_path / "work"),
                        "--out", str(tmp_path / "out"), "--n", "10", "--no-timing", "--threads", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert data["meta"]["provenance"]["mode"] == "shipped" and data["meta"]["n_items"] == 10
    assert any("--quick" in note for note in data["meta"]["provenance"]["notes"])
    with open(tmp_path / "out" / "reproduce.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == LABELS
    # no --precision: auto, resolved for this machine (bf16 only with AMX), recorded in the JSON and the report
    from visor.precision import resolve_precision

    auto = resolve_precision("auto")
    assert data["meta"]["eval"]["precision"] == auto and f"precision {auto};" in (tmp_path / "out" / "reproduce.md").read_text()


def test_selector_positions_original_marks_and_reruns_only_the_selector_rows(quick, tmp_path):
    """``--selector-positions original``: VisionZip, VisPruner, HiRED and VISOR + VisionZip run with ``@original``
    and say so (label, budget, report note); every other row is the cached one of a plain run."""
    root, work = quick["root"], tmp_path / "work"
    common = ["reproduce", "--checkpoints", str(root / "checkpoints"), "--work-dir", str(work), "--n", "10",
              "--no-timing", "--threads", "1", "--no-progress"]
    plain = visor_cli([*common, "--out", str(tmp_path / "plain")])
    assert plain.returncode == 0, plain.stderr[-4000:]
    result = visor_cli([*common, "--out", str(tmp_path / "out"), "--selector-positions", "original"])
    assert result.returncode == 0, result.stderr[-4000:]
    marked = {"VisionZip", "VisPruner", "HiRED", "VISOR + VisionZip"}
    with open(tmp_path / "out" / "reproduce.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == [f"{m} @original" if m in marked else m for m in LABELS]
    data = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert data["meta"]["eval"]["selector_positions"] == "original"
    reducers = {m["label"]: m["reducer"] for m in data["meta"]["methods"]}
    assert all(reducers[f"{m} @original"].endswith("@original") for m in marked)
    assert reducers["pooling 4x"] == "pooling:4x" and "@" not in reducers["FastV"]
    assert "Not the published selectors" in (tmp_path / "out" / "reproduce.md").read_text()
    assert "Not the published selectors" not in (tmp_path / "plain" / "reproduce.md").read_text()
    cached = [line for line in result.stdout.splitlines() if line.rstrip().endswith("(cached)")]
    assert any(line.strip().startswith("LLaVA-OV baseline") for line in cached)
    assert not any("@original" in line for line in cached)


def test_with_selector_positions_changes_only_pre_llm_selectors():
    from visor.reproduce import methods as M

    rows = [*M.fixed_compression_methods(), *M.routed_methods(-1.0),
            M.Method("hired", "HiRED", "base", "compression", reducer="hired:0.22", budget="keep 0.22"),
            M.Method("fastv", "FastV", "base", "compression", reducer="fastv:0.5", budget="keep 0.5")]
    assert M.with_selector_positions(rows, "contiguous") == rows
    changed = {m.key: m for m in M.with_selector_positions(rows, "original")}
    assert changed["hired"].reducer == "hired:0.22@original" and changed["hired"].label == "HiRED @original"
    assert changed["visor-visionzip"].reducer == "visionzip:0.25@original"
    assert changed["visor-visionzip"].route and "original positions" in changed["visor-visionzip"].budget
    for key in ("baseline", "pooling-2x", "pooling-4x", "visor-routed", "visor-tr-2x", "fastv"):
        assert changed[key] == next(m for m in rows if m.key == key)
    with pytest.raises(ValueError, match="unknown selector position mode"):
        M.with_selector_positions(rows, "shuffled")


def test_a_visor_tr_model_is_added_to_a_shipped_set_that_has_none(quick, tmp_path):
    """``visor reproduce --add-tr RUN``: the set gains ``visor-tr/`` and its recipe, the manifest verifies with them
    and records the command; a run that is not VISOR-TR, or was not fine-tuned from the set's universal model, or a
    set that already has one, is a clear error that leaves the set as it was."""
    from visor.reproduce.shipped import load_shipped, ship

    work = quick["root"] / "work"
    recipes = {k: yaml.safe_load((quick["root"] / "checkpoints" / "recipes" / f"{k}.yaml").read_text())
               for k in ("vision", "base", "focus", "stage1", "stage2")}
    folder = ship(tmp_path / "set", work / "2b-focus" / "run" / "final", work / "7-router" / "model", recipes,
                  {"route_budget": 0.0}, preset="quick", commit="test")
    assert load_shipped(folder).visor_tr is None
    before = (folder / "MANIFEST.json").read_text()

    not_tr = visor_cli(["reproduce", "--add-tr", str(work / "5-stage2" / "run" / "final"), "--checkpoints", str(folder)])
    assert not_tr.returncode == 2 and "not a VISOR-TR run" in not_tr.stderr
    other = tmp_path / "other-tr"
    shutil.copytree(work / "9-tr" / "run" / "final", other)
    recipe = json.loads((other / "recipe.json").read_text())
    (other / "recipe.json").write_text(json.dumps({**recipe, "init": str(work / "5-stage2" / "run" / "final")}))
    wrong_init = visor_cli(["reproduce", "--add-tr", str(other), "--checkpoints", str(folder)])
    assert wrong_init.returncode == 2 and "not this set's universal model" in wrong_init.stderr
    assert (folder / "MANIFEST.json").read_text() == before and not (folder / "visor-tr").exists()

    added = visor_cli(["reproduce", "--add-tr", str(work / "9-tr" / "run" / "final"), "--checkpoints", str(folder)])
    assert added.returncode == 0, added.stderr[-2000:]
    shipped = load_shipped(folder)  # every file, the new ones included, against its sha256
    assert shipped.visor_tr == folder / "visor-tr" and shipped.recipes["tr"].reducers == ["pooling:2x", "pooling:4x"]
    entry = shipped.manifest["checkpoints"]["visor_tr"]
    assert entry["reducers"] == ["pooling:2x", "pooling:4x"] and "--add-tr" in entry["command"]
    assert "visor-tr/model.safetensors" in shipped.manifest["files"] and set(shipped.model_ids) == {"base", "visor", "visor_tr"}
    again = visor_cli(["reproduce", "--add-tr", str(work / "9-tr" / "run" / "final"), "--checkpoints", str(folder)])
    assert again.returncode == 2 and "already has" in again.stderr


def test_missing_or_modified_shipped_checkpoints_are_clear_errors(quick, tmp_path, capsys):
    from visor.cli.main import main
    from visor.reproduce.shipped import ShippedCheckpointsError, load_shipped

    assert main(["reproduce", "--checkpoints", str(tmp_path / "none"), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "visor reproduce --train" in err and "--quick" in err
    copy = tmp_path / "copy"
    shutil.copytree(quick["root"] / "checkpoints", copy)
    config = copy / "visor" / "config.json"
    config.write_text(config.read_text().replace('"ca_conv_kernel": 7', '"ca_conv_kernel": 5'))
    with pytest.raises(ShippedCheckpointsError, match="config.json"):
        load_shipped(copy)
    (copy / "MANIFEST.json").unlink()
    with pytest.raises(ShippedCheckpointsError, match="--train"):
        load_shipped(copy)


def test_choose_budget_records_a_new_budget_in_a_shipped_set(quick, tmp_path):
    """`visor reproduce --choose-budget --budget-n N`: the shipped router's budget chosen again by the pipeline's
    rule on N validation items, recorded in the set's pipeline.yaml and manifest (the set still verifies, and the
    manifest says what it replaced); refused beside --train."""
    from visor.reproduce.shipped import load_shipped
    from visor.routing.budget import choose_budget

    copy = tmp_path / "set"
    shutil.copytree(quick["root"] / "checkpoints", copy)
    before = load_shipped(copy)
    work = tmp_path / "work"
    result = visor_cli(["reproduce", "--choose-budget", "--checkpoints", str(copy), "--budget-n", "6", "--work-dir",
                        str(work), "--threads", "1", "--precision", "fp32", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    after = load_shipped(copy)  # the hashes in the manifest follow the rewritten pipeline.yaml
    [report] = list(work.glob("shipped-*/budget-n6/report/route_report.json"))
    choice = json.loads((report.parents[1] / "budget.json").read_text())
    rows = json.loads(report.read_text())["rows"]
    assert choice == json.loads(json.dumps(choose_budget(rows, tolerance=before.pipeline["budget_tolerance"])))
    assert choice["budget"] in before.pipeline["budget_candidates"]
    assert after.pipeline["route_budget"] == choice["budget"] and after.pipeline["budget_n"] == 6
    assert after.pipeline["route_budget_choice"] == choice
    record = after.manifest["budget"]
    assert record["previous"] == before.pipeline["route_budget"] and record["budget_n"] == 6
    assert "--choose-budget" in record["command"]
    assert {k: v for k, v in after.pipeline.items() if not k.startswith(("route_budget", "budget_n"))} == \
        {k: v for k, v in before.pipeline.items() if not k.startswith(("route_budget", "budget_n"))}
    assert f"route budget {before.pipeline['route_budget']} -> {choice['budget']}" in result.stdout
    refused = visor_cli(["reproduce", "--choose-budget", "--train"])
    assert refused.returncode == 2 and "budget stage" in refused.stderr


def test_ship_requires_train(capsys, tmp_path):
    from visor.cli.main import main

    assert main(["reproduce", "--ship", "--checkpoints", str(tmp_path)]) == 2
    assert "--train" in capsys.readouterr().err


def test_training_stage_under_torchrun_matches_one_process(tmp_path):
    """`visor reproduce --nproc 2`: a training stage run by torchrun (2 DDP processes, micro-batch split to
    fit) ends at the parameters of the in-process run, and a finished stage is returned, not retrained."""
    import torch
    from safetensors.torch import load_file

    from visor.reproduce.pipeline import train_stage_distributed
    from visor.reproduce.presets import quick_preset
    from visor.train.loop import Trainer
    from visor.train.recipe import Recipe, build

    raw = dict(quick_preset().recipes["vision"])  # global batch 8, micro-batch 8: torchrun gets 2 x 4
    # compared with one process over the same micro-batches (2 x 4): equal up to float summation order
    one = build(Recipe, {**raw, "micro_batch": 4, "out_dir": str(tmp_path / "one" / "run")})
    final_one = Trainer(one, progress=False).train()
    two = build(Recipe, {**raw, "out_dir": str(tmp_path / "two" / "run")})
    final_two = train_stage_distributed(two.to_dict(), tmp_path / "two", 2, progress=False)
    assert final_two == tmp_path / "two" / "run" / "final"
    assert "micro_batch: 4" in (tmp_path / "two" / "recipe-ddp.yaml").read_text()
    a, b = load_file(str(final_one / "model.safetensors")), load_file(str(final_two / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = (tmp_path / "two" / "run" / "metrics.jsonl").read_text()
    assert train_stage_distributed(two.to_dict(), tmp_path / "two", 2, progress=False) == final_two  # resumed at its end
    assert (tmp_path / "two" / "run" / "metrics.jsonl").read_text() == metrics  # no step was trained again
    with pytest.raises(ValueError, match="does not divide"):
        train_stage_distributed({**two.to_dict(), "out_dir": str(tmp_path / "three" / "run")}, tmp_path / "three", 3,
                                progress=False)


def test_sigterm_stops_a_distributed_stage_with_a_checkpoint(tmp_path):
    """SIGTERM to `visor reproduce` reaches the torchrun workers: they save a checkpoint at their current
    step and the stage reports itself interrupted (resumable), not failed."""
    script = tmp_path / "stop.py"
    script.write_text(f"""
import os, signal, sys, threading, time
from pathlib import Path
from visor.reproduce.pipeline import train_stage_distributed
from visor.reproduce.presets import quick_preset
from visor.train.recipe import Recipe, build
tmp = Path({str(tmp_path)!r})
raw = dict(quick_preset().recipes["base"], max_steps=400, save_every=1000)
recipe = build(Recipe, {{**raw, "out_dir": str(tmp / "run")}})
def stop_once_training():
    while not (tmp / "run" / "metrics.jsonl").exists():
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_once_training, daemon=True).start()
print("RESULT", train_stage_distributed(recipe.to_dict(), tmp, 2, progress=False))
""")
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT None" in result.stdout
    from visor.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and 0 < int(checkpoint.name.split("_")[1]) < 400  # saved mid-run, on the signal


def test_status_reads_the_work_dir(quick, tmp_path):
    """`visor reproduce --status`: every stage of a finished quick run complete at its last step; a running
    stage's progress, throughput, time left and latest validation come from its metrics.jsonl."""
    result = visor_cli(["reproduce", "--quick", "--status", "--work-dir", str(quick["root"] / "work")])
    assert result.returncode == 0, result.stderr[-2000:]
    stages = {s["name"]: s for s in json.loads(result.stdout.strip().splitlines()[-1])["stages"]}
    assert list(stages) == ["vision", "base", "focus", "stage1", "configs", "stage2", "labels", "router", "budget", "tr"]
    assert all(s["status"] == "complete" for s in stages.values())
    assert stages["tr"]["step"] == stages["tr"]["max_steps"] == 2
    assert stages["base"]["step"] == stages["base"]["max_steps"] == 6 and stages["base"]["eta_s"] is None

    from visor.reproduce.status import format_status, work_dir_status

    run = tmp_path / "2-base" / "run"
    run.mkdir(parents=True)
    (tmp_path / "2-base" / "stage.json").write_text(json.dumps(
        {"stage": "base", "status": "running", "spec": {"max_steps": 100, "global_batch": 4}, "seconds": 60}))
    rows = [{"step": 10, "loss": 2.0, "samples_per_s": 1.0}, {"step": 20, "loss": 1.5, "samples_per_s": 3.0},
            {"step": 20, "eval": {"easy_mean": 0.5, "hard_mean": 0.25, "n_items": 8}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2')  # cut by a crash
    base = work_dir_status(tmp_path)[1]
    assert (base.status, base.step, base.loss, base.samples_per_s) == ("running", 20, 1.5, 2.0)
    assert base.eta_s == (100 - 20) * 4 / 2.0 and base.validation == {"step": 20, "easy_mean": 0.5, "hard_mean": 0.25}
    table = format_status(work_dir_status(tmp_path))
    assert "20/100 (20%)" in table and "easy 50.0%, hard 25.0%" in table and "2m40s" in table
    assert work_dir_status(tmp_path)[2].status == "pending"
    missing = visor_cli(["reproduce", "--status", "--work-dir", str(tmp_path / "nothing")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ---------------------------------------------------------------------- stage cache
def test_stage_cache_skips_resumes_and_invalidates(tmp_path):
    logs = []
    calls = []

    def body(folder: Path, fail: bool = False):
        calls.append(sorted(p.name for p in folder.iterdir()))
        (folder / "partial").write_text("x")
        if fail:
            raise StageInterrupted("stopped")
        (folder / "out.txt").write_text("done")
        return {"out": "out.txt"}

    cache = StageCache(tmp_path, log=logs.append)
    with pytest.raises(StageInterrupted):
        cache.run("train", "1-train", {"lr": 1}, {}, lambda f: body(f, fail=True), resumable=True)
    first = cache.run("train", "1-train", {"lr": 1}, {}, body, resumable=True)  # resumes: keeps what was there
    assert "partial" in calls[-1] and not first.cached and any("resuming" in m for m in logs)
    again = cache.run("train", "1-train", {"lr": 1}, {}, body, resumable=True)
    assert again.cached and again.output_id == first.output_id and len(calls) == 2
    child = cache.run("next", "2-next", {}, {"train": first.output_id}, body)
    assert cache.run("next", "2-next", {}, {"train": again.output_id}, body).cached
    changed = cache.run("train", "1-train", {"lr": 2}, {}, body, resumable=True)  # new settings: fresh folder
    assert not changed.cached and calls[-1] == ["stage.json"] and (tmp_path / "1-train.stale" / "out.txt").exists()
    assert changed.output_id != first.output_id
    redone = cache.run("next", "2-next", {}, {"train": changed.output_id}, body)  # upstream redone: downstream too
    assert not redone.cached and redone.output_id != child.output_id
    forced = StageCache(tmp_path, force={"next"}, log=logs.append).run("next", "2-next", {}, {"train": changed.output_id}, body)
    assert not forced.cached
    # a non-resumable stage that was interrupted starts over
    with pytest.raises(StageInterrupted):
        cache.run("label", "3-label", {}, {}, lambda f: body(f, fail=True))
    cache.run("label", "3-label", {}, {}, body)
    assert calls[-1] == ["stage.json"]



def test_reuse_from_takes_a_complete_stage_with_the_same_key_instead_of_redoing_a_stale_or_running_copy(tmp_path):
    """A variant's work dir that already holds an old copy of a stage (another key) or an interrupted one takes
    the source's complete stage as hard links instead of training it again; other keys still run."""
    source, variant = tmp_path / "source", tmp_path / "variant"
    runs: list[str] = []

    def body(folder: Path):
        runs.append(folder.parent.name)
        (folder / "weights").write_text(folder.parent.name)
        return {"final": "weights"}

    done = StageCache(source, log=lambda *_: None).run("stage1", "3-stage1", {"lr": 1}, {}, body, resumable=True)
    old = StageCache(variant, log=lambda *_: None).run("stage1", "3-stage1", {"lr": 0.5}, {}, body, resumable=True)
    assert runs == ["source", "variant"] and old.output_id != done.output_id
    logs: list[str] = []
    cache = StageCache(variant, log=logs.append, reuse_from=source)
    reused = cache.run("stage1", "3-stage1", {"lr": 1}, {}, body, resumable=True)
    assert reused.cached and reused.output_id == done.output_id and runs == ["source", "variant"]
    assert os.stat(reused.path("final")).st_ino == os.stat(done.path("final")).st_ino  # linked, not copied
    assert (variant / "3-stage1.stale" / "weights").exists() and any("reused (hard-linked)" in m for m in logs)
    assert cache.run("stage1", "3-stage1", {"lr": 1}, {}, body).cached  # and from now on it is simply here
    # an interrupted copy with the very key the source finished: the finished one wins over resuming
    (variant / "4-configs").mkdir()
    record = {"stage": "configs", "key": digest({"stage": "configs", "spec": {}, "inputs": {}}), "status": "running"}
    (variant / "4-configs" / "stage.json").write_text(json.dumps(record))
    finished = StageCache(source, log=lambda *_: None).run("configs", "4-configs", {}, {}, body)
    assert cache.run("configs", "4-configs", {}, {}, body, resumable=True).output_id == finished.output_id
    # settings the source never ran: run here
    assert not cache.run("stage2", "5-stage2", {"steps": 3}, {}, body).cached and runs[-1] == "variant"
    with pytest.raises(FileNotFoundError, match="not a work directory"):
        StageCache(variant, reuse_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="itself"):
        StageCache(variant, reuse_from=variant)


# ---------------------------------------------------------------------- rows from predictions
def test_row_from_predictions_uses_only_the_predictions():
    from visor.reproduce.evaluation import row_from_predictions
    from visor.reproduce.methods import Method
    from visor.reproduce.projection import baseline_flops, projected_flops

    preds = ([{"family": "color", "difficulty": "easy", "score": s, "llm_flops": 10.0, "active_sa": "none", "visual_tokens": 5}
              for s in (1.0, 0.0)]
             + [{"family": "code", "difficulty": "hard", "score": s, "llm_flops": 30.0, "active_sa": "0+1", "visual_tokens": 5}
                for s in (1.0, None)])
    method = Method("visor-routed", "VISOR routed", "visor", "visor", route=True)
    router = {"configs": [[], [0], [0, 1]], "num_tokens": 1, "mlp_hidden": 8}
    row = row_from_predictions(method, preds, base_flops=40.0, base_projected=baseline_flops(), router=router,
                               seconds=2.0, base_seconds=4.0)
    assert row["easy_mean"] == 0.5 and row["hard_mean"] == 0.5 and row["n_skipped"] == 1
    assert row["mean_flops"] == 20.0 and row["flops_reduction"] == 2.0 and row["prefill_speedup"] == 2.0
    assert row["chosen"] == {"none": 2, "0+1": 2} and row["n_sa_mean"] == 1.0
    expected = (projected_flops(0, None, (1, 8, 3)) + projected_flops(2, None, (1, 8, 3))) / 2
    assert row["projected_flops"] == pytest.approx(expected)
    assert row["projected_reduction"] == pytest.approx(baseline_flops() / expected)


def test_a_finished_run_is_not_trained_or_exported_again(tmp_path):
    """A stage whose run finished but was stopped before the stage was marked complete (a kill at the very
    end) resumes in process without training, evaluating or exporting again."""
    from visor.reproduce.pipeline import train_all
    from visor.reproduce.presets import quick_preset

    cache = StageCache(tmp_path, log=lambda *_: None)
    with pytest.raises(StopAtStage):
        train_all(quick_preset(), cache, progress=False, log=lambda *_: None, on_stage=stop_at("base"))
    record_file = tmp_path / "1-vision" / "stage.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "status": "running"}))  # as if killed before it was marked
    run = tmp_path / "1-vision" / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    logs: list[str] = []
    with pytest.raises(StopAtStage):
        train_all(quick_preset(), cache, progress=False, log=logs.append, on_stage=stop_at("base"))
    assert any("not evaluated or exported again" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert json.loads(record_file.read_text())["status"] == "complete"


def test_reuse_from_links_complete_stages_and_a_variant_skips_them(quick, tmp_path):
    """`--reuse-from`: the complete stages of another work dir are hard-linked (same inodes, no copies) and
    skipped; a variant whose settings differ from the configuration search on redoes only those stages."""
    from visor.reproduce.pipeline import train_all
    from visor.reproduce.presets import quick_preset
    from visor.reproduce.stages import link_completed_stages

    source = quick["root"] / "work"
    preset = quick_preset()
    preset.configs_resolutions = ["full", "base"]
    logs: list[str] = []
    cache = StageCache(tmp_path / "variant", log=logs.append, reuse_from=source)
    with pytest.raises(StopAtStage):
        train_all(preset, cache, progress=False, log=logs.append, on_stage=stop_at("stage2"))
    reused = {line.split("]")[0][1:] for line in logs if "] reused (hard-linked)" in line}
    assert reused == {"vision", "base", "focus", "stage1"}
    weights = tmp_path / "variant" / "2b-focus" / "run" / "final" / "model.safetensors"
    assert os.stat(weights).st_ino == os.stat(source / "2b-focus" / "run" / "final" / "model.safetensors").st_ino
    assert any(line.startswith("[configs] ") for line in logs) and "configs" not in reused
    # the source's own folders are untouched by the variant's redo
    assert json.loads((source / "4-configs" / "stage.json").read_text())["status"] == "complete"
    assert (source / "4-configs" / "out" / "config.json").exists()
    # linking every complete stage up front (a work dir seeded from another) does the same in one go
    linked = link_completed_stages(source, tmp_path / "seeded", log=lambda *_: None)
    assert {"1-vision", "2-base", "2b-focus", "3-stage1", "4-configs"} <= set(linked)
    with pytest.raises(ValueError, match="itself"):
        link_completed_stages(source, source)


def test_a_second_continuation_of_the_baseline_becomes_the_baseline_and_visor_builds_on_it(quick, tmp_path):
    """``focus2`` continues ``focus``: its init is the focus run's final model, stage 1 starts from its output,
    the shipped manifest names its recipe as the baseline's, and `--status` lists it once started."""
    from visor.reproduce.pipeline import train_all
    from visor.reproduce.presets import quick_preset
    from visor.reproduce.shipped import MANIFEST, ship
    from visor.reproduce.stages import link_completed_stages
    from visor.reproduce.status import work_dir_status

    work = tmp_path / "work"
    link_completed_stages(quick["root"] / "work", work, log=lambda *_: None)

    preset = quick_preset()
    preset.recipes["focus2"] = {**preset.recipes["focus"], "max_steps": 1, "save_every": 1}
    assert preset.baseline_stage() == "focus2"
    cache = StageCache(work, log=lambda *_: None)
    with pytest.raises(StopAtStage):
        train_all(preset, cache, progress=False, log=lambda *_: None, on_stage=stop_at("configs"))
    focus2 = json.loads((work / "2c-focus2" / "stage.json").read_text())
    focus = json.loads((work / "2b-focus" / "stage.json").read_text())
    assert focus2["status"] == "complete" and focus2["inputs"] == {"base": focus["output_id"]}
    stage1 = json.loads((work / "3-stage1" / "stage.json").read_text())
    assert stage1["inputs"] == {"base": focus2["output_id"]}  # redone on the new baseline
    ddp_free = (work / "2c-focus2" / "run" / "final" / "recipe.json").read_text()
    assert json.loads(ddp_free)["init"].endswith("2b-focus/run/final")
    assert [s.name for s in work_dir_status(work)][:5] == ["vision", "base", "focus", "focus2", "stage1"]
    assert "focus2" not in [s.name for s in work_dir_status(quick["root"] / "work")]  # not started there

    recipes = {name: {"kind": "base", "init": "x"} for name in ("base", "focus", "focus2")}
    ship(tmp_path / "ship", work / "2c-focus2" / "run" / "final", quick["root"] / "work" / "7-router" / "model",
         recipes, {}, preset="quick", commit="test")
    manifest = json.loads((tmp_path / "ship" / MANIFEST).read_text())
    assert manifest["checkpoints"]["base"]["recipe"] == "recipes/focus2.yaml"


def test_a_continuation_of_stage2_becomes_the_universal_model(quick, tmp_path):
    """``stage2b`` continues stage 2: its init is stage 2's final model, the labels start from its output, the
    shipped manifest names its recipe as the universal model's, `--status` lists it, and a model trained further from
    such a set records its stage 2 and stage 1 after it."""
    from visor.reproduce.pipeline import train_all
    from visor.reproduce.presets import full_preset, quick_preset, universal_provenance
    from visor.reproduce.shipped import MANIFEST, load_shipped, ship
    from visor.reproduce.stages import link_completed_stages
    from visor.reproduce.status import work_dir_status

    assert full_preset().recipes["stage2b"]["kind"] == "visor-stage2"  # the repository's recipe, in --train
    work = tmp_path / "work"
    link_completed_stages(quick["root"] / "work", work, log=lambda *_: None)
    preset = quick_preset()
    preset.recipes["stage2b"] = {**preset.recipes["stage2"], "max_steps": 1, "save_every": 1}
    with pytest.raises(StopAtStage):
        train_all(preset, StageCache(work, log=lambda *_: None), progress=False, log=lambda *_: None,
                  on_stage=stop_at("labels"))
    stage2b = json.loads((work / "5b-stage2b" / "stage.json").read_text())
    stage2 = json.loads((work / "5-stage2" / "stage.json").read_text())
    assert stage2b["status"] == "complete" and stage2b["inputs"] == {"stage2": stage2["output_id"]}
    run_recipe = json.loads((work / "5b-stage2b" / "run" / "final" / "recipe.json").read_text())
    assert run_recipe["init"].endswith("5-stage2/run/final")
    names = [s.name for s in work_dir_status(work)]
    assert names.index("stage2b") == names.index("stage2") + 1

    shipped_q = load_shipped(quick["root"] / "checkpoints")
    recipes = {k: r.to_dict() for k, r in shipped_q.recipes.items()} | {"stage2b": run_recipe}
    ship(tmp_path / "ship", shipped_q.base, shipped_q.visor, recipes, {}, preset="quick", commit="test")
    assert json.loads((tmp_path / "ship" / MANIFEST).read_text())["checkpoints"]["visor"]["recipe"] == "recipes/stage2b.yaml"
    continued = tmp_path / "continued"
    shutil.copytree(tmp_path / "ship" / "visor", continued)
    recipe = json.loads((continued / "recipe.json").read_text())
    (continued / "recipe.json").write_text(json.dumps({**recipe, "init": str(tmp_path / "ship" / "visor")}))
    chain = universal_provenance(continued)
    assert list(chain) == ["universal", "universal-init-1", "universal-init-2", "universal-init-3"]
    assert [chain[f"universal-init-{k}"]["kind"] for k in (2, 3)] == ["visor-stage2", "visor-stage1"]


def test_a_given_baseline_replaces_the_base_stages_and_its_provenance_is_shipped(quick, tmp_path):
    """``--baseline DIR``: no vision or base stage runs; stage 1 starts from DIR, keyed on its contents (not its
    path); the shipped manifest names the given baseline's recipe, with its ancestors' (each run's init) beside it,
    and the shipped preset takes it as the baseline."""
    from visor.reproduce.pipeline import given_stage, train_all
    from visor.reproduce.presets import baseline_provenance, preset_from_settings, quick_preset
    from visor.reproduce.shipped import MANIFEST, load_shipped, ship

    given = (quick["root"] / "work" / "2b-focus" / "run" / "final").resolve()
    preset = quick_preset().with_baseline(given)
    assert preset.baseline_stage() == "baseline"
    assert not {"vision", "base", "focus"} & set(preset.recipes)
    assert preset.benchmark_image_size() == quick_preset().benchmark_image_size()
    work = tmp_path / "work"
    with pytest.raises(StopAtStage):
        train_all(preset, StageCache(work, log=lambda *_: None), progress=False, log=lambda *_: None,
                  on_stage=stop_at("configs"))
    assert [p.name for p in work.iterdir()] == ["3-stage1"]
    stage1 = json.loads((work / "3-stage1" / "stage.json").read_text())
    assert stage1["inputs"] == {"base": given_stage("baseline", given).output_id}
    assert json.loads((work / "3-stage1" / "run" / "final" / "recipe.json").read_text())["init"] == str(given)

    moved = tmp_path / "moved"
    shutil.copytree(given, moved)
    assert given_stage("baseline", moved).output_id == given_stage("baseline", given).output_id
    (moved / "generation_config.json").write_text("{}")
    assert given_stage("baseline", moved).output_id != given_stage("baseline", given).output_id

    chain = baseline_provenance(given)  # focus <- base (whose own init is empty)
    assert list(chain) == ["baseline", "baseline-init-1"]
    assert chain["baseline"]["init"].endswith("2-base/run/final") and chain["baseline-init-1"]["init"] is None
    stages = {k: {**v, "kind": k.replace("stage", "visor-stage"), "out_dir": "x", "init": "y"}
              for k, v in quick_preset().recipes.items() if k in ("stage1", "stage2")}
    ship(tmp_path / "ship", given, quick["root"] / "work" / "7-router" / "model", {**chain, **stages}, {},
         preset="quick", commit="test")
    manifest = json.loads((tmp_path / "ship" / MANIFEST).read_text())
    assert manifest["checkpoints"]["base"]["recipe"] == "recipes/baseline.yaml"
    shipped = load_shipped(tmp_path / "ship")
    assert set(shipped.recipes) == {"baseline", "baseline-init-1", "stage1", "stage2"}
    assert preset_from_settings(shipped.pipeline, shipped.recipes).baseline_stage() == "baseline"

    # a baseline continued from the shipped set's base: its chain goes on with the ancestors the set recorded
    continued = tmp_path / "continued"
    shutil.copytree(given, continued)
    recipe = json.loads((given / "recipe.json").read_text())
    (continued / "recipe.json").write_text(json.dumps({**recipe, "init": str(tmp_path / "ship" / "base")}))
    longer = baseline_provenance(continued)
    assert list(longer) == ["baseline", "baseline-init-1", "baseline-init-2"]
    assert longer["baseline-init-1"] == json.loads((tmp_path / "ship" / "base" / "recipe.json").read_text())
    assert longer["baseline-init-2"]["init"] is None and longer["baseline-init-2"]["kind"] == "base"
    assert longer["baseline-init-2"]["out_dir"] == chain["baseline-init-1"]["out_dir"]


def test_a_given_baseline_must_be_a_llava_onevision_run_with_its_recipe(quick, tmp_path, capsys):
    from visor.cli.main import main

    assert main(["reproduce", "--baseline", str(tmp_path)]) == 2  # plain reproduce evaluates what is shipped
    assert "--train or --quick" in capsys.readouterr().err
    visor = quick["root"] / "work" / "7-router" / "model"
    for folder, message in ((tmp_path, "no config.json"), (visor, "'visor' checkpoint")):
        assert main(["reproduce", "--quick", "--baseline", str(folder), "--work-dir", str(tmp_path / "w")]) == 2
        assert message in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(quick["root"] / "work" / "2-base" / "run" / "final", bare)
    (bare / "recipe.json").unlink()
    assert main(["reproduce", "--quick", "--baseline", str(bare), "--work-dir", str(tmp_path / "w")]) == 2
    assert "no recipe.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_benchmark_canvas_is_the_baselines_and_visor_stages_must_match_it():
    """Every method is evaluated on one canvas: the baseline's (its last base run: focus4, ..., focus, else base); an earlier stage may
    pre-train on another, while a VISOR stage on a different canvas is refused."""
    from visor.reproduce.pipeline import eval_spec_for
    from visor.reproduce.presets import Preset, full_preset

    full = full_preset()
    # the full preset's baseline is its last continuation, the one that trains a shape head on the tower
    assert full.baseline_stage() == "focus4" and full.recipes["focus4"]["vision_shape_weight"] > 0
    size = (full.recipes[full.baseline_stage()].get("data") or {}).get("synth_image_size")
    assert full.benchmark_image_size() == size
    assert eval_spec_for(full, timing=False, route_budget=0.0).synth == ({"image_size": size} if size else {})
    recipes = {"base": {"data": {"synth_image_size": 192}}, "focus": {"data": {"synth_image_size": 128}},
               "stage1": {"data": {"synth_image_size": 128}}, "stage2": {"data": {"synth_image_size": 128}}}
    assert Preset(name="p", recipes=recipes).benchmark_image_size() == 128
    with pytest.raises(ValueError, match="different benchmark canvases"):
        Preset(name="p", recipes={k: v for k, v in recipes.items() if k != "focus"}).benchmark_image_size()


def test_pareto_labels_do_not_overlap_and_each_points_at_its_own_marker(tmp_path):
    """Crowded points (several methods at the matched FLOPs) get labels that overlap neither each other nor
    the legend, and every label's leader line starts at its own point."""
    from visor.plotting import place_labels, pyplot

    plt = pyplot()
    points = [(1.9e9, 25.0 + 0.5 * i, f"method {i}") for i in range(6)] + [(6e9, 30.0, "baseline"), (6e8, 24.0, "CA-only")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, _ in points:
        ax.scatter(x, y, label=None)
    ax.scatter([], [], label="group")
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.legend(loc="lower right")
    fig.tight_layout()
    notes = place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    for note in notes:
        note.update_positions(renderer)
    boxes = [Text.get_window_extent(n, renderer) for n in notes] + [ax.get_legend().get_window_extent(renderer)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    assert [n.get_text() for n in notes] == [t for _, _, t in points]
    assert [tuple(n.xy) for n in notes] == [(x, y) for x, y, _ in points]
    fig.savefig(tmp_path / "labels.png")
    plt.close(fig)


def test_targets_compare_points_without_float_error():
    """A margin of exactly 10 points (35.2% vs 25.2%, which differ by 9.999999999999998 in floats) meets
    ">= 10 points"; one item less does not."""
    from visor.reproduce.report import check_targets

    def row(key, easy, hard, **extra):
        return {"key": key, "method": key, "group": extra.pop("group", "visor"), "easy_mean": easy,
                "hard_mean": hard, **extra}

    rows = [row("baseline", 0.752, 0.32), row("visor-routed", 0.76, 0.352, projected_reduction=8.5),
            row("fastv", 0.524, 0.252, group="compression", matched=True, budget="keep 0.183"),
            row("hired", 0.556, 0.256, group="compression", matched=True, budget="keep 0.358")]
    holds = {t["target"].split(" (")[0]: t["holds"] for t in check_targets(rows)}
    assert holds["VISOR routed beats fastv"] is True
    assert holds["VISOR routed beats hired"] is False


def test_a_given_universal_model_replaces_stages_1_to_2_and_its_provenance_is_shipped(quick, tmp_path):
    """``--baseline B --universal U``: no stage 1, configuration search or stage 2 runs; the labels start from U,
    keyed on its contents; the shipped manifest names U's recipe, with its ancestors' beside it, and a model trained
    further from a shipped set's universal model records that set's stage 1 after it."""
    from visor.reproduce.pipeline import given_stage
    from visor.reproduce.presets import quick_preset, universal_provenance
    from visor.reproduce.shipped import MANIFEST, load_shipped

    work_q = quick["root"] / "work"
    base, universal = work_q / "2b-focus" / "run" / "final", work_q / "5-stage2" / "run" / "final"
    preset = quick_preset().with_baseline(base).with_universal(universal)
    assert not {"stage1", "stage2"} & set(preset.recipes) and preset.given_universal == str(universal.resolve())
    assert preset.benchmark_image_size() == quick_preset().benchmark_image_size()

    work, ship_dir = tmp_path / "work", tmp_path / "ship"
    result = visor_cli(["reproduce", "--quick", "--baseline", str(base), "--universal", str(universal), "--work-dir",
                        str(work), "--out", str(tmp_path / "out"), "--ship", "--checkpoints", str(ship_dir),
                        "--n", "10", "--no-timing", "--threads", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert not {"3-stage1", "4-configs", "5-stage2"} & {p.name for p in work.iterdir()}
    labels = json.loads((work / "6-labels" / "stage.json").read_text())
    assert labels["inputs"] == {"stage2": given_stage("universal", universal).output_id}
    report = (tmp_path / "out" / "reproduce.md").read_text()
    assert f"--universal {universal}" in report and f"--baseline {base}" in report

    chain = universal_provenance(universal)  # stage 2 <- stage 1 (via the configs copy) <- the focus baseline <- base
    assert list(chain)[:2] == ["universal", "universal-init-1"] and chain["universal-init-1"]["kind"] == "visor-stage1"
    manifest = json.loads((ship_dir / MANIFEST).read_text())
    assert manifest["checkpoints"]["visor"]["recipe"] == "recipes/universal.yaml"
    shipped = load_shipped(ship_dir)
    assert {"baseline", "universal", "universal-init-1"} <= set(shipped.recipes) and "stage2" not in shipped.recipes
    assert shipped.recipes["universal"].to_dict() == chain["universal"]

    # trained further from a shipped set's universal model: the chain ends with what that set recorded before it
    for source, expected in ((quick["root"] / "checkpoints", ["visor-stage1"]),
                             (ship_dir, [r["kind"] for k, r in chain.items() if k != "universal"])):
        continued = tmp_path / f"continued-{source.name}"
        shutil.copytree(source / "visor", continued)
        recipe = json.loads((source / "visor" / "recipe.json").read_text())
        (continued / "recipe.json").write_text(json.dumps({**recipe, "init": str(source / "visor")}))
        longer = universal_provenance(continued)
        assert longer["universal-init-1"] == recipe
        assert [longer[f"universal-init-{k}"]["kind"] for k in range(2, len(longer))] == expected


def test_a_given_universal_model_must_be_a_stage2_visor_run_with_its_baseline(quick, tmp_path, capsys):
    from visor.cli.main import main

    work_q = quick["root"] / "work"
    base = str(work_q / "2b-focus" / "run" / "final")
    universal = str(work_q / "5-stage2" / "run" / "final")
    w = ["--work-dir", str(tmp_path / "w")]
    for args in (["--universal", universal], ["--quick", "--universal", universal] + w,
                 ["--quick", "--baseline", base, "--universal", universal, "--resolutions", "full,base"] + w):
        assert main(["reproduce", *args]) == 2  # plain reproduce; no baseline; its own viable set
        assert "--universal gives --train or --quick" in capsys.readouterr().err
    for folder, message in ((base, "not a VISOR one"), (work_q / "3-stage1" / "run" / "final", "no viable configurations"),
                            (work_q / "9-tr" / "run" / "final", "VISOR-TR (reducers) recipe")):
        assert main(["reproduce", "--quick", "--baseline", base, "--universal", str(folder)] + w) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_given_universal_model_built_on_another_baseline_is_warned_about(quick, tmp_path):
    """VISOR's stages keep the vision tower frozen, so a universal model carries its baseline's tower: a baseline
    whose tower differs (another baseline) is reported in the log and the report's notes, not silently compared."""
    import torch
    from safetensors.torch import load_file, save_file

    from visor.reproduce.pipeline import train_all
    from visor.reproduce.presets import quick_preset, tower_mismatch

    work_q = quick["root"] / "work"
    base, universal = work_q / "2b-focus" / "run" / "final", work_q / "5-stage2" / "run" / "final"
    assert tower_mismatch(base, universal) is None
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = load_file(str(other / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.startswith("vision_tower.") and weights[k].is_floating_point())
    weights[key] = weights[key] + 0.5
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert key in tower_mismatch(other, universal)

    preset = quick_preset().with_baseline(other).with_universal(universal)
    messages = []
    with pytest.raises(StopAtStage):
        train_all(preset, StageCache(tmp_path / "work", log=lambda *_: None), progress=False, log=messages.append,
                  on_stage=stop_at("labels"))
    assert any("[universal] warning" in m and key in m for m in messages)
    assert any(n.startswith("warning:") for n in preset.notes)


def test_a_score_router_is_trained_and_its_budget_chosen_in_score_units(quick, tmp_path):
    """``--router score --label-n N``: the labels and the router rerun (the trained stages are reused), the shipped
    universal model carries a score router, the budget stage chose among the score budgets, and the preset recorded
    beside the checkpoints says so; plain evaluation refuses the training-only flags."""
    from visor.reproduce.presets import SCORE_BUDGETS
    from visor.reproduce.shipped import load_shipped

    work, ship_dir = tmp_path / "work", tmp_path / "ship"
    result = visor_cli(["reproduce", "--quick", "--router", "score", "--label-n", "12", "--work-dir", str(work),
                        "--reuse-from", str(quick["root"] / "work"), "--out", str(tmp_path / "out"), "--ship",
                        "--checkpoints", str(ship_dir), "--threads", "1", "--no-progress", "--no-timing"])
    assert result.returncode == 0, result.stderr[-4000:]
    labels = [line for line in (work / "6-labels" / "labels.jsonl").read_text().splitlines() if line.strip()]
    assert len(labels) == 12
    config = json.loads((ship_dir / "visor" / "config.json").read_text())
    assert config["router"]["objective"] == "score"
    choice = json.loads((work / "8-budget" / "budget.json").read_text())
    assert [c["budget"] for c in choice["candidates"]] == list(SCORE_BUDGETS)
    shipped = load_shipped(ship_dir)
    assert shipped.pipeline["router_objective"] == "score" and shipped.pipeline["label_n"] == 12
    refused = visor_cli(["reproduce", "--router", "score"])
    assert refused.returncode == 2 and "--router" in refused.stderr


def test_router_objective_of_a_preset():
    from visor.reproduce.presets import SCORE_BUDGETS, quick_preset

    preset = quick_preset()
    scored = preset.with_router_objective("score")
    assert scored.router_objective == "score" and scored.budget_candidates == list(SCORE_BUDGETS)
    assert preset.router_objective == "label" and preset.budget_candidates == [0.0, -1.0]  # unchanged
    assert preset.with_router_objective("label") is preset
    with pytest.raises(ValueError, match="objective"):
        preset.with_router_objective("margin")
