"""Router: the label rule, routed generation == per-sample fixed configurations, independence from batch
neighbours, budgets, checkpoint round trip, labelling/training/report end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_image_processor, tiny_llava_config
from visor.model.modeling import VisorForConditionalGeneration
from visor.routing.labels import choose_label
from visor.routing.router import attach_router


# ---------------------------------------------------------------------- label rule
COSTS = {(): 1.0, (0,): 2.0, (0, 1): 3.0}


@pytest.mark.parametrize(
    "scores, threshold, expected",
    [
        ({(): 1.0, (0,): 1.0, (0, 1): 1.0}, 0.99, ()),  # all pass: cheapest
        ({(): 0.0, (0,): 0.0, (0, 1): 0.0}, 0.99, ()),  # all fail, maximal fails too: 0 >= 0.99 * 0
        ({(): 0.0, (0,): 1.0, (0, 1): 1.0}, 0.99, (0,)),  # tie between (0,) and maximal: the cheaper
        ({(): 0.5, (0,): 0.8, (0, 1): 1.0}, 0.99, (0, 1)),  # only the maximal keeps 99%
        ({(): 0.5, (0,): 0.8, (0, 1): 1.0}, 0.75, (0,)),  # threshold is a parameter
        ({(): 0.985, (0,): 0.2, (0, 1): 0.99}, 0.99, ()),  # probabilities: 0.985 >= 0.99 * 0.99
    ],
)
def test_label_is_the_cheapest_configuration_within_threshold(scores, threshold, expected):
    assert choose_label(scores, COSTS, threshold) == expected


def test_label_rule_rejects_bad_input():
    with pytest.raises(ValueError):
        choose_label({}, COSTS)
    with pytest.raises(ValueError):
        choose_label({(): 1.0}, {(): 1.0}, threshold=1.5)


# ---------------------------------------------------------------------- a tiny routed model
@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor.data.tokenizer import build_tokenizer
    from visor.eval.harness import synth_items

    root = tmp_path_factory.mktemp("route")
    tok = build_tokenizer()
    config = tiny_llava_config(num_layers=6, hidden=32, image_size=32)
    config.text_config.vocab_size = len(tok)
    torch.manual_seed(0)
    llava = LlavaOnevisionForConditionalGeneration(config).eval()
    model = VisorForConditionalGeneration.from_llava_onevision(llava)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cross_attn." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.config.viable_configs = [[], [0], [0, 1]]
    attach_router(model, model.config.viable_configs)
    with torch.no_grad():  # a random router that disagrees across samples
        for p in model.router.parameters():
            p.copy_(2.0 * torch.randn(p.shape, generator=gen))
    processor = tiny_image_processor(config)
    items = synth_items("val", 8, families=["color", "code", "side", "dots"])
    # centre the random router's logits over these items so that its decisions differ between them
    from visor.data.batch import Batcher, Sample
    from visor.routing.router import routing_logits

    batch = Batcher.for_model(model, tok, processor).prompt_batch([Sample(it.images, it.turns) for it in items])
    feats = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
    with torch.no_grad():
        logits = routing_logits(model, batch["input_ids"], batch["attention_mask"], model._assign_images(feats, 8, None))
        model.router.mlp[-1].bias -= logits.mean(0)
    folder = root / "visor"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return {"model": model, "tok": tok, "processor": processor, "items": items, "folder": folder, "root": root}


def prompt_batch(routed, items):
    from visor.data.batch import Batcher, Sample

    batcher = Batcher.for_model(routed["model"], routed["tok"], routed["processor"])
    return batcher.prompt_batch([Sample(it.images, it.turns) for it in items])


def test_decisions_depend_only_on_the_sample(routed):
    model, items = routed["model"], routed["items"]
    together = model.route(**prompt_batch(routed, items))
    assert len(set(together)) > 1, "the test router must disagree across samples"
    alone = [model.route(**prompt_batch(routed, [it]))[0] for it in items]
    assert together == alone
    shuffled = model.route(**prompt_batch(routed, items[::-1]))
    assert shuffled[::-1] == together


def test_routed_batch_equals_each_sample_alone_with_its_configuration(routed):
    model, items = routed["model"], routed["items"]
    batch = prompt_batch(routed, items)
    routed_out = model.generate(**batch, route=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    decisions = model.route(**batch)
    prompt_len = batch["input_ids"].shape[1]
    for i, item in enumerate(items):
        single = prompt_batch(routed, [item])
        alone = model.generate(**single, active_sa=decisions[i], max_new_tokens=4, eos_token_id=2, pad_token_id=0)
        new_alone = alone[0, single["input_ids"].shape[1]:]
        assert torch.equal(routed_out[i, prompt_len: prompt_len + new_alone.numel()], new_alone)


def test_budget_moves_decisions(routed):
    model, items = routed["model"], routed["items"]
    batch = prompt_batch(routed, items)
    assert set(model.route(**batch, budget=1e6)) == {()}
    assert set(model.route(**batch, budget=-1e6)) == {(0, 1)}


def test_router_round_trips_through_a_checkpoint(routed):
    loaded = VisorForConditionalGeneration.from_pretrained(routed["folder"])
    assert loaded.config.router["configs"] == [[], [0], [0, 1]]
    for (name, a), (_, b) in zip(routed["model"].router.state_dict().items(), loaded.router.state_dict().items()):
        assert torch.equal(a, b), name
    batch = prompt_batch(routed, routed["items"])
    assert loaded.route(**batch) == routed["model"].route(**batch)


def test_label_train_report_end_to_end(routed, tmp_path, capsys):
    from visor.cli.main import main

    folder = str(routed["folder"])
    labels = tmp_path / "labels.jsonl"
    assert main(["route", "label", "--model", folder, "--n", "6", "--out", str(labels), "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 6 and all(set(r["grader_scores"]) == {"none", "0", "0+1"} for r in rows)
    assert all(0.0 <= p <= 1.0 for r in rows for p in r["loglik_scores"].values())
    assert main(["route", "train", "--model", folder, "--labels", str(labels), "--n", "6", "--epochs", "3",
                 "--out", str(tmp_path / "with_router")]) == 0
    assert main(["route", "train", "--model", folder, "--labels", str(labels), "--n", "6", "--epochs", "2",
                 "--objective", "score", "--score-field", "loglik", "--out", str(tmp_path / "score_router")]) == 0
    scored = VisorForConditionalGeneration.from_pretrained(str(tmp_path / "score_router"))
    assert scored.config.router["objective"] == "score"
    assert main(["route", "report", "--model", str(tmp_path / "with_router"), "--n", "4", "--out", str(tmp_path / "report"),
                 "--budget", "0", "--budget", "1"]) == 0
    report = json.loads((tmp_path / "report" / "route_report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["fixed none", "fixed 0", "fixed 0+1", "routed (budget 0)", "routed (budget 1)"]
    assert (tmp_path / "report" / "route_pareto.png").exists()
    fixed = {r["method"]: r["mean_flops"] for r in report["rows"]}
    assert fixed["fixed none"] < fixed["fixed 0"] < fixed["fixed 0+1"]
    # each routed row's gap to the maximal fixed row, on the same items, with its interval around it
    maximal = report["rows"][2]
    for row in report["rows"][3:]:
        assert row["vs_maximal"], row["method"]
        for difficulty, (gap, low, high) in row["vs_maximal"].items():
            assert gap == pytest.approx(100 * (row[f"{difficulty}_mean"] - maximal[f"{difficulty}_mean"]), abs=1e-3)
            assert low <= gap + 1e-9 and gap <= high + 1e-9


def test_route_report_gaps_are_paired_macro_means_per_difficulty():
    from visor.routing.report import gaps_with_intervals

    reference = {f"c{k}": ("color", 1.0) for k in range(10)} | {f"d{k}": ("dots", 0.0) for k in range(10)}
    routed = {f"c{k}": ("color", 1.0 if k else 0.0) for k in range(10)} | {f"d{k}": ("dots", 0.0) for k in range(10)}
    gaps = gaps_with_intervals(routed, reference)
    assert gaps["easy"][0] == pytest.approx(-10.0) and gaps["easy"][1] <= -10.0 <= gaps["easy"][2]
    assert gaps["hard"] == [0.0, 0.0, 0.0]
    assert set(gaps_with_intervals({"c0": ("color", 1.0)}, {"c0": ("color", 1.0)})) == {"easy"}


def test_router_training_fits_labels(routed):
    from visor.routing.train import train_router

    model = VisorForConditionalGeneration.from_pretrained(routed["folder"])
    items = routed["items"]
    labels = [0 if it.difficulty == "easy" else 2 for it in items]  # a learnable rule: easy -> CA only, hard -> max
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("router.")}
    result = train_router(model, routed["tok"], routed["processor"], items, labels, [[], [0], [0, 1]], epochs=40,
                          lr=5e-3, batch_size=8, progress=False, autocast=False)
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before), "backbone changed"


def test_score_router_learns_what_each_configuration_adds_and_the_budget_trades_it_for_cost(routed, tmp_path):
    """A score router predicts each configuration's score. Easy items score 1 under every configuration; hard ones
    score 0.6 / 0.8 / 0.9 with 0, 1 and 2 SA layers, so every hard label (the cheapest within 99%) is the maximal
    configuration but what the maximal one adds is 10 points over one SA layer. At budget 0 the router maximises
    predicted score: easy items get any configuration, hard ones the maximal; a budget that charges twice the
    maximal configuration's 10-point gain for its extra cost moves hard items down, and a huge one sends
    everything to CA-only. Saved and reloaded, it keeps its objective and its decisions."""
    from visor.routing.router import relative_costs, router_objective
    from visor.routing.train import train_router

    model = VisorForConditionalGeneration.from_pretrained(routed["folder"])
    items = routed["items"]
    targets = [[1.0, 1.0, 1.0] if it.difficulty == "easy" else [0.6, 0.8, 0.9] for it in items]
    labels = [0 if it.difficulty == "easy" else 2 for it in items]
    result = train_router(model, routed["tok"], routed["processor"], items, labels, [[], [0], [0, 1]], epochs=150,
                          lr=1e-2, batch_size=8, progress=False, autocast=False, score_targets=targets)
    assert router_objective(model) == "score"
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert result["history"][-1]["train_accuracy"] == 1.0  # every budget-0 choice has the item's best score
    batch = prompt_batch(routed, items)
    hard = [i for i, it in enumerate(items) if it.difficulty == "hard"]
    assert {model.route(**batch)[i] for i in hard} == {(0, 1)}
    # the predicted gain of the maximal over one SA layer (~0.1) against the budget's charge for the extra cost
    mask = batch["attention_mask"].bool()
    n_visual = ((batch["input_ids"] == model.config.image_token_id) & mask).sum(1)
    costs = relative_costs(model, n_visual.tolist(), (mask.sum(1) - n_visual).tolist())
    step = float((costs[hard[0], 2] - costs[hard[0], 1]))
    cheaper = model.route(**batch, budget=2 * 0.1 / step)
    assert all(len(cheaper[i]) < 2 for i in hard)
    assert set(model.route(**batch, budget=1e6)) == {()}
    model.save_pretrained(str(tmp_path / "score"))
    loaded = VisorForConditionalGeneration.from_pretrained(str(tmp_path / "score"))
    assert router_objective(loaded) == "score" and loaded.route(**batch) == model.route(**batch)


def test_score_router_rejects_bad_targets(routed):
    from visor.routing.train import train_router

    model = VisorForConditionalGeneration.from_pretrained(routed["folder"])
    items = routed["items"][:2]
    with pytest.raises(ValueError, match="2 rows of 3 scores"):
        train_router(model, routed["tok"], routed["processor"], items, [0, 0], [[], [0], [0, 1]], epochs=1,
                     progress=False, autocast=False, score_targets=[[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_router(model, routed["tok"], routed["processor"], items, [0, 0], [[], [0], [0, 1]], epochs=1,
                     progress=False, autocast=False, score_targets=[[1.0, 2.0, 1.0]] * 2)
    with pytest.raises(ValueError, match="objective"):
        attach_router(model, [[], [0]], objective="margin")


def test_generate_cli_routes_and_matches_the_chosen_fixed_configuration(routed, tmp_path, capsys):
    """`visor generate --route` runs the router's pick: same answer as `--active-sa PICK`; budgets move the pick."""
    import json

    from visor.cli.main import main

    picks = set()
    for i, item in enumerate(routed["items"][:4]):
        path = tmp_path / f"{i}.png"
        item.images[0].save(path)
        question = item.turns[0]["value"].replace("<image>", "").strip()
        args = ["generate", "--model", str(routed["folder"]), "--image", str(path), "--prompt", question, "--max-new-tokens", "3"]
        for extra in (["--route"], ["--budget=1e6"], ["--budget=-1e6"]):
            assert main(args + extra) == 0
            chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert main(args + ["--active-sa", chosen["active_sa"]]) == 0
            fixed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert chosen["answer"] == fixed["answer"] and chosen["route"] and chosen["resolution"] == "full"
            picks.add((tuple(extra), chosen["active_sa"]))
    assert {p for e, p in picks if e == ("--budget=1e6",)} == {"none"}
    assert {p for e, p in picks if e == ("--budget=-1e6",)} == {"0+1"}
    with pytest.raises(SystemExit, match="drop --active-sa"):
        main(args + ["--route", "--active-sa", "0"])


def test_budget_rule_picks_the_cheapest_budget_within_tolerance_else_the_least_shortfall():
    """``visor.routing.budget.choose_budget`` on constructed validation rows: the reference is the dearest fixed
    configuration; the cheapest budget within 1 point on both means wins; with none within, the smallest
    shortfall of the worse mean (ties: cheaper)."""
    from visor.routing.budget import choose_budget

    def fixed(name, easy, hard, flops):
        return {"method": f"fixed {name}", "easy_mean": easy, "hard_mean": hard, "mean_flops": flops}

    def routed(budget, easy, hard, flops):
        return {"method": f"routed (budget {budget:g})", "budget": budget, "easy_mean": easy, "hard_mean": hard,
                "mean_flops": flops}

    table = [fixed("none", 0.60, 0.20, 1.0), fixed("0+1+2", 0.70, 0.30, 4.0)]
    within = table + [routed(0.0, 0.695, 0.29, 2.0), routed(-1.0, 0.71, 0.31, 3.0), routed(0.5, 0.65, 0.25, 1.5)]
    choice = choose_budget(within)
    assert choice["budget"] == 0.0 and choice["within_tolerance"]  # -1 is also within, but dearer
    assert choice["reference"]["method"] == "fixed 0+1+2"
    assert [c["budget"] for c in choice["candidates"]] == [0.0, -1.0, 0.5]
    assert choice["candidates"][0]["shortfall"] == pytest.approx(-0.01)  # exactly 1 point: within
    # none within: the one whose worse mean falls least (-1: -0.02 hard beats 0: -0.05 easy)
    missed = table + [routed(0.0, 0.65, 0.29, 2.0), routed(-1.0, 0.69, 0.28, 3.0)]
    choice = choose_budget(missed)
    assert choice["budget"] == -1.0 and not choice["within_tolerance"]
    # equal shortfalls: the cheaper; equal cost within tolerance: the larger (cheaper-leaning) budget
    tie = table + [routed(0.0, 0.68, 0.30, 2.0), routed(-1.0, 0.70, 0.28, 3.0)]
    assert choose_budget(tie)["budget"] == 0.0
    same_cost = table + [routed(-1.0, 0.70, 0.30, 2.0), routed(0.0, 0.70, 0.30, 2.0)]
    assert choose_budget(same_cost)["budget"] == 0.0
    assert choose_budget(missed, tolerance=0.02)["within_tolerance"]  # the tolerance is a parameter
    with pytest.raises(ValueError, match="routed rows"):
        choose_budget(table)


# ---------------------------------------------------------------------- relabelling stored scores
def _stored_row(grader, loglik, costs=None):
    row = {"id": "x", "family": "color", "difficulty": "easy", "score_kind": "loglik",
           "grader_scores": grader, "loglik_scores": loglik}
    if costs is not None:
        row["costs"] = costs
    return row


def test_relabel_applies_the_rule_to_stored_scores_at_another_threshold():
    from visor.routing.labels import relabel

    row = _stored_row({"none": 1.0, "0": 1.0, "0+1": 1.0}, {"none": 0.90, "0": 0.96, "0+1": 0.99})
    (strict,) = relabel([row], 0.99)
    assert strict["label"] == [0, 1] and strict["label_index"] == 2 and strict["threshold"] == 0.99
    (loose,) = relabel([row], 0.95)
    assert loose["label"] == [0] and loose["label_index"] == 1
    assert relabel([row], 0.90)[0]["label"] == []  # 0.90 >= 0.90 * 0.99
    (by_grader,) = relabel([row], 0.99, score="grader")  # every configuration passes the grader: the cheapest
    assert by_grader["label"] == [] and by_grader["score_kind"] == "grader"
    assert strict["label_by_grader"] == [] and strict["label_by_loglik"] == [0, 1]
    assert strict["grader_scores"] == row["grader_scores"]  # the stored scores travel unchanged
    with pytest.raises(ValueError, match="score"):
        relabel([row], 0.9, score="bleu")


def test_relabel_orders_by_stored_costs_and_else_by_sa_slot_count():
    from visor.routing.labels import relabel

    scores = {"none": 0.5, "0": 0.99, "base:0+1": 0.99, "0+1": 1.0}
    # stored costs: the base-resolution configuration with two SA layers is cheaper than full resolution with one
    costs = {"none": 1.0, "base:0+1": 2.0, "0": 3.0, "0+1": 4.0}
    (row,) = relabel([_stored_row(scores, scores, costs)], 0.99)
    assert row["label"] == {"resolution": "base", "active_sa": [0, 1]} and row["label_index"] == 2
    plain = {"none": 0.5, "1": 0.99, "0+1": 1.0}
    assert relabel([_stored_row(plain, plain)], 0.99)[0]["label"] == [1]  # no costs: fewer SA slots is cheaper


def test_relabel_cli_sweeps_a_threshold_without_the_model(tmp_path, capsys):
    from visor.cli.main import main
    from visor.routing.labels import write_labels

    rows = [_stored_row({"none": 1.0, "0": 1.0}, {"none": p, "0": 1.0}) | {"id": f"i{k}"} for k, p in enumerate((0.5, 0.97))]
    source, out = tmp_path / "labels.jsonl", tmp_path / "t95.jsonl"
    write_labels(rows, source)
    assert main(["route", "relabel", str(source), "--threshold", "0.95", "--out", str(out)]) == 0
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels == [[0], []]
    assert json.loads(out.with_suffix(".summary.json").read_text())["per_family"] == {"color": {"0": 1, "none": 1}}
    with pytest.raises(SystemExit, match="relabel"):
        main(["route", "relabel", str(tmp_path / "missing.jsonl"), "--threshold", "0.9", "--out", str(out)])


def test_reference_accuracies_say_what_a_sample_blind_router_scores():
    from visor.routing.train import reference_accuracies

    labels = [0, 0, 1, 2, 2, 2]
    families = ["color", "color", "color", "code", "code", "doc"]
    ref = reference_accuracies(labels, families)
    assert ref["majority"] == pytest.approx(3 / 6)  # always 2
    assert ref["family_majority"] == pytest.approx(5 / 6)  # color -> 0 (2 of 3), code -> 2, doc -> 2
    assert "family_majority" not in reference_accuracies(labels, [None] * 6)  # LLaVA data without families


def test_routing_ceiling_compares_items_at_their_labels_with_a_family_table():
    from visor.routing.labels import routing_ceiling

    def row(family, difficulty, label, none, full):
        return {"family": family, "difficulty": difficulty, "label": label,
                "grader_scores": {"none": none, "0+1": full}, "loglik_scores": {"none": none, "0+1": full}}

    rows = [row("color", "easy", [], 1.0, 0.0),  # CA-only right, maximal wrong: labelled none
            row("color", "easy", [], 1.0, 1.0),
            row("color", "easy", [0, 1], 0.0, 1.0),
            row("code", "hard", [0, 1], 0.0, 1.0)]
    ceiling = routing_ceiling(rows)
    easy = ceiling["easy"]
    assert easy["n"] == 3 and easy["fixed"] == {"none": pytest.approx(2 / 3), "0+1": pytest.approx(2 / 3)}
    assert easy["oracle"] == {"score": pytest.approx(1.0), "mean_sa": pytest.approx(2 / 3)}
    assert easy["family_table"]["table"] == {"color": "none"}  # 2 of 3 colour items are labelled none
    assert easy["family_table"]["score"] == pytest.approx(2 / 3) and easy["family_table"]["mean_sa"] == 0
    assert ceiling["hard"]["oracle"]["score"] == 1.0 and ceiling["hard"]["family_table"]["table"] == {"code": "0+1"}


def test_router_generalisation_benchmark_scores_held_out_labels_against_the_family_table(routed, tmp_path, monkeypatch):
    """``benchmarks/router_generalisation.py`` end to end on the tiny model: labels on train and val items, two
    router variants fitted, held-out accuracies and agreement with the family table in [0, 1]."""
    import importlib.util
    import sys

    from visor.cli.main import main

    folder = str(routed["folder"])
    for split, n in (("train", 6), ("val", 4)):
        assert main(["route", "label", "--model", folder, "--split", split, "--n", str(n), "--batch-size", "3",
                     "--precision", "fp32", "--out", str(tmp_path / f"{split}.jsonl")]) == 0
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "router_generalisation.py"
    spec = importlib.util.spec_from_file_location("router_generalisation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "VARIANTS", {"default": {"epochs": 2}, "wider": {"num_tokens": 2, "epochs": 2},
                                            "deep": {"read_after_layer": bench.LAST_CA, "epochs": 2}})
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["router_generalisation.py", "--model", folder, "--train-labels", str(tmp_path / "train.jsonl"),
                                      "--val-labels", str(tmp_path / "val.jsonl"), "--precision", "fp32", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["n_train"] == 6 and result["n_val"] == 4 and set(result["routers"]) == {"default", "wider", "deep"}
    assert result["routers"]["deep"]["settings"]["read_after_layer"] == 4  # the tiny plan .CS.CS: CA at 1 and 4
    assert 0.0 <= result["family_table_val_accuracy"] <= 1.0
    for row in result["routers"].values():
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["val_agrees_with_family_table"] <= 1.0
        assert row["reference_accuracy"]["family_majority"] >= row["reference_accuracy"]["majority"]


def test_a_router_may_read_after_a_deeper_layer_and_routed_output_still_equals_the_fixed_configuration(routed):
    """The routing pass is its own CA-only run, so a router reading after layer 4 (past SA slot 0 at layer 2) still
    leaves each sample's output exactly the chosen fixed configuration's; the pass costs the extra layers."""
    from visor.routing.router import router_overhead_flops

    model = VisorForConditionalGeneration.from_pretrained(routed["folder"]).eval()
    shallow = router_overhead_flops(model, 100, 20)
    gen = torch.Generator().manual_seed(3)
    attach_router(model, [[], [0], [0, 1]], read_after_layer=4)
    with torch.no_grad():
        for p in model.router.parameters():
            p.copy_(2.0 * torch.randn(p.shape, generator=gen))
    assert model.config.router["read_after_layer"] == 4 and router_overhead_flops(model, 100, 20) > shallow
    items = routed["items"]
    batch = prompt_batch(routed, items)
    routed_out = model.generate(**batch, route=True, max_new_tokens=3, eos_token_id=2, pad_token_id=0)
    decisions = model.route(**batch)
    for i, item in enumerate(items):
        single = prompt_batch(routed, [item])
        alone = model.generate(**single, active_sa=decisions[i], max_new_tokens=3, eos_token_id=2, pad_token_id=0)
        new_alone = alone[0, single["input_ids"].shape[1]:]
        assert torch.equal(routed_out[i, batch["input_ids"].shape[1]: batch["input_ids"].shape[1] + new_alone.numel()], new_alone)
    with pytest.raises(ValueError, match="read_after_layer"):
        attach_router(model, [[], [0]], read_after_layer=6)  # the tiny plan has 6 layers
