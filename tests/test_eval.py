"""``visor eval`` end to end on tiny random checkpoints: numbers re-derived by hand, bad input, FLOPs.

The checkpoints use the benchmark tokenizer (so synth questions tokenise) and are tiny (3 layers,
hidden 32, 32 px base view); every run evaluates a handful of items.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_benchmark_llava, tiny_image_processor
from visor.cli.main import main
from visor.cost import Geometry, count_prefill
from visor.eval.graders import grade
from visor.model.plan import LayerPlan
from visor.model.vision import image_token_count

N_LAYERS = 3


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A LLaVA-OV folder, its VISOR conversion and a 'visor data synth' folder (built once)."""
    root = tmp_path_factory.mktemp("eval")
    model, tok, config = tiny_benchmark_llava(N_LAYERS, seed=0)
    assert tok.convert_tokens_to_ids("<image>") == config.image_token_id
    llava = root / "llava"
    model.save_pretrained(str(llava))
    tok.save_pretrained(str(llava))
    tiny_image_processor(config).save_pretrained(str(llava))
    visor = root / "visor"
    assert main(["convert", str(llava), str(visor)]) == 0
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--split", "test", "--n", "6", "--families", "color", "code",
                 "--no-progress"]) == 0
    return {"root": root, "llava": llava, "visor": visor, "data": data, "tok": tok, "config": config}


def run_eval(capsys, *args: str) -> dict:
    """Run ``visor eval`` in-process; the last stdout line parsed as JSON (stderr under ``"_stderr"``)."""
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--max-new-tokens", "3", *args]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    line["_stderr"] = captured.err
    return line


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def hand_summary(rows: list[dict]) -> dict:
    """Family means (unscored = 0), easy/hard means as macro averages over families."""
    fams: dict[str, list[float]] = {}
    diff: dict[str, str] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(0.0 if r["score"] is None else r["score"])
        diff[r["family"]] = r["difficulty"]
    per_family = {f: sum(v) / len(v) for f, v in fams.items()}

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "per_family": per_family,
        "easy_mean": mean([v for f, v in per_family.items() if diff[f] == "easy"]),
        "hard_mean": mean([v for f, v in per_family.items() if diff[f] == "hard"]),
        "n_items": len(rows),
        "n_skipped": sum(r["score"] is None for r in rows),
    }


def prompt_tokens(work, record: dict) -> tuple[int, int]:
    """(visual, text) tokens of a synth record's prompt, derived without the harness's Batcher."""
    from PIL import Image

    config, tok = work["config"], work["tok"]
    with Image.open(work["data"] / record["image"]) as im:
        size = (im.height, im.width)
    n_visual = image_token_count(size, grid_pinpoints=config.image_grid_pinpoints,
                                 base_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size,
                                 vision_aspect_ratio=config.vision_aspect_ratio)
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return n_visual, len(ids) - ids.count(config.image_token_id)


def records(work) -> list[dict]:
    return [json.loads(line) for line in (work["data"] / "test.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- end to end
def test_eval_matches_hand_computation(work, capsys, tmp_path):
    """Synth on the fly, then a LLaVA file whose references are partly the model's own answers: every
    number of the last JSON line is re-derived from predictions.jsonl, the graders and the cost model."""
    out_a = tmp_path / "a"
    line_a = run_eval(capsys, "--model", str(work["llava"]), "--data", "synth", "--n", "6", "--families", "color",
                      "code", "--batch-size", "3", "--out", str(out_a))
    rows_a = read_predictions(out_a)
    recs = records(work)
    assert [r["id"] for r in rows_a] == [r["id"] for r in recs]  # on the fly == 'visor data synth'
    assert [r["answer"] for r in rows_a] == [r["conversations"][1]["value"] for r in recs]
    assert line_a["n_items"] == 6 and line_a["n_skipped"] == 0

    # references: the model's own answer for items 0, 1, 3 (exact), a near miss for item 4 (anls)
    crafted = []
    for k, (rec, row) in enumerate(zip(recs, rows_a)):
        rec = json.loads(json.dumps(rec))
        if k in (0, 1, 3):
            rec["conversations"][1]["value"] = row["prediction"]
            rec["grader"] = "exact"
        elif k == 4:
            rec["conversations"][1]["value"] = row["prediction"] + "x"
            rec["grader"] = "anls"
        elif k == 5:  # several accepted references: the best one counts
            rec["answers"] = ["certainly wrong", row["prediction"]]
            rec["grader"] = "exact"
        crafted.append(rec)
    data_file = work["data"] / "crafted.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in crafted))
    out_b = tmp_path / "b"
    line_b = run_eval(capsys, "--model", str(work["llava"]), "--data", str(data_file), "--batch-size", "3",
                      "--out", str(out_b))
    rows_b = read_predictions(out_b)
    assert [r["prediction"] for r in rows_b] == [r["prediction"] for r in rows_a]  # same prompts, same answers
    # re-grade every prediction with the graders
    for rec, row in zip(crafted, rows_b):
        assert row["score"] == grade(rec["grader"], row["prediction"], rec.get("answers", rec["conversations"][1]["value"]))
    assert [rows_b[k]["score"] for k in (0, 1, 3, 5)] == [1.0, 1.0, 1.0, 1.0]
    assert 0.0 < rows_b[4]["score"] < 1.0 or rows_b[4]["prediction"] == ""
    hand = hand_summary(rows_b)
    for key in ("easy_mean", "hard_mean", "n_items", "n_skipped"):
        assert line_b[key] == pytest.approx(hand[key]), key
    assert line_b["per_family"] == pytest.approx(hand["per_family"])
    assert set(hand["per_family"]) == {"color", "code"} and hand["easy_mean"] != hand["hard_mean"]
    # partial credit: edit similarity per item (1 for the exact items, 1 - 1/len for the near miss)
    from visor.eval.graders import levenshtein

    for k, (rec, row) in enumerate(zip(crafted, rows_b)):
        refs = rec.get("answers") or [rec["conversations"][1]["value"]]
        p = " ".join(row["prediction"].lower().split())
        want = max(1.0 - levenshtein(p, " ".join(r.lower().split())) / max(len(p), len(r), 1) for r in refs)
        assert row["similarity"] == pytest.approx(want if p or any(refs) else 1.0)
    assert [rows_b[k]["similarity"] for k in (0, 1, 3, 5)] == [1.0, 1.0, 1.0, 1.0]
    similar = hand_summary([{**r, "score": r["similarity"]} for r in rows_b])
    assert line_b["hard_similarity_mean"] == pytest.approx(similar["hard_mean"])
    assert line_b["easy_similarity_mean"] == pytest.approx(similar["easy_mean"])

    # FLOPs: the baseline (every layer SA) from counts made without the harness
    geometry = Geometry.from_config(work["config"])
    plan = LayerPlan.all_self_attention(N_LAYERS)
    flops = []
    for rec, row in zip(crafted, rows_b):
        n_visual, n_text = prompt_tokens(work, rec)
        assert (row["visual_tokens"], row["text_tokens"]) == (n_visual, n_text)
        flops.append(count_prefill(geometry, plan, None, n_visual, n_text).llm_total)
        assert row["llm_flops"] == flops[-1]
    assert line_b["mean_flops"] == pytest.approx(sum(flops) / len(flops))
    summary = json.loads((out_b / "summary.json").read_text())
    assert summary["mean_flops"] == line_b["mean_flops"] and summary["model_kind"] == "llava_onevision"
    assert summary["plan"]["cross_attention_layers"] == [] and summary["active_sa"] == "0+1+2"


def test_flops_depend_on_active_slots(work, capsys, tmp_path):
    """On a VISOR checkpoint, --sa-count 0 costs less per item than every slot, both as the cost model says."""
    runs = {}
    for name, choice in (("none", ["--sa-count", "0"]), ("all", ["--active-sa", "all"])):
        out = tmp_path / name
        line = run_eval(capsys, "--model", str(work["visor"]), "--data", str(work["data"]), "--n", "2",
                        *choice, "--out", str(out))
        runs[name] = (line, read_predictions(out))
    geometry = Geometry.from_config(work["config"])
    plan = LayerPlan.default(N_LAYERS)
    assert plan.num_slots == 1
    for (none, all_) in zip(runs["none"][1], runs["all"][1]):
        assert none["active_sa"] == "none" and all_["active_sa"] == "0"
        assert none["llm_flops"] < all_["llm_flops"]
        nv, nt = none["visual_tokens"], none["text_tokens"]
        assert none["llm_flops"] == count_prefill(geometry, plan, (), nv, nt).llm_total
        assert all_["llm_flops"] == count_prefill(geometry, plan, (0,), nv, nt).llm_total
    assert runs["none"][0]["mean_flops"] < runs["all"][0]["mean_flops"]
    assert runs["all"][0]["model_kind"] == "visor"


def test_reduce_or_clear_error(work, capsys, tmp_path):
    """--reduce shrinks the visual tokens and the FLOPs (or says clearly that it is not available)."""
    from visor.model.generation import generate
    import inspect

    args = ["--model", str(work["llava"]), "--data", str(work["data"]), "--n", "2", "--batch-size", "2"]
    if "reducer" not in inspect.signature(generate).parameters:
        with pytest.raises(SystemExit, match="not available yet"):
            main(["eval", *args, "--reduce", "pooling:0.25", "--out", str(tmp_path / "r")])
        return
    full = run_eval(capsys, *args, "--out", str(tmp_path / "full"))
    reduced = run_eval(capsys, *args, "--reduce", "pooling:0.25", "--out", str(tmp_path / "r"))
    assert reduced["mean_visual_tokens"] < full["mean_visual_tokens"]
    assert reduced["mean_flops"] < full["mean_flops"]
    assert reduced["reduce"] == "pooling:0.25"


def test_route_without_router_is_a_clear_error(work, tmp_path):
    with pytest.raises(SystemExit, match="no router"):
        main(["eval", "--model", str(work["visor"]), "--data", "synth", "--n", "1", "--route",
              "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no router"):
        main(["eval", "--model", str(work["visor"]), "--data", "synth", "--n", "1", "--budget", "0.5",
              "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------------- bad input
def test_bad_items_are_reported_and_counted(work, capsys, tmp_path):
    """Per item: missing image, corrupt PNG, malformed JSON, a non-object record are skipped and counted;
    an image without <image> tag runs with a warning; n_items equals the records (non-blank lines)."""
    data = work["data"]
    good = records(work)[0]  # a color (easy) item
    png = (data / good["image"]).read_bytes()
    (data / "images" / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated
    (data / "images" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    no_tag = json.loads(json.dumps(good))
    no_tag["id"] = "no-tag"
    no_tag["conversations"][0]["value"] = no_tag["conversations"][0]["value"].replace("<image>\n", "")
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "missing", "image": "images/nope.png"}),
        json.dumps({**good, "id": "truncated", "image": "images/corrupt.png"}),
        json.dumps({**good, "id": "garbage", "image": "images/garbage.png", "family": "code", "difficulty": "hard"}),
        '{"id": "broken", "image": ',
        "",  # blank lines are not items
        "[1, 2, 3]",
        json.dumps(no_tag),
        json.dumps({"id": "text-only", "family": "color", "grader": "yesno",
                    "conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "yes"}]}),
        json.dumps({**good, "id": "tag-no-image", "image": []}),
    ]
    path = data / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bad"
    line = run_eval(capsys, "--model", str(work["llava"]), "--data", str(path), "--batch-size", "4", "--out", str(out))
    err = line["_stderr"]
    rows = read_predictions(out)
    n_records = sum(1 for l in lines if l.strip())
    assert line["n_items"] == len(rows) == n_records == 9
    by_id = {r["id"]: r for r in rows}
    expected = {"missing": "missing_image", "truncated": "corrupt_image", "garbage": "corrupt_image",
                "bad.jsonl:5": "malformed_json", "bad.jsonl:7": "bad_record", "tag-no-image": "image_tag_mismatch"}
    for ident, reason in expected.items():
        row = by_id[ident]
        assert row["score"] is None and row["reason"] == reason and row["prediction"] is None, row
        assert reason in row["problem"]
    assert "nope.png" in by_id["missing"]["problem"]
    assert by_id["missing"]["answer"] == good["conversations"][1]["value"]  # the reference, even when skipped
    assert line["n_skipped"] == 6
    assert line["skipped_by_reason"] == {"bad_record": 1, "corrupt_image": 2, "image_tag_mismatch": 1,
                                         "malformed_json": 1, "missing_image": 1}
    # skipped items stay in their family's denominator when the record names it
    assert by_id["missing"]["family"] == "color" and by_id["garbage"]["family"] == "code"
    assert line["per_family_n"] == {"(unreadable)": 2, "code": 1, "color": 6}
    assert by_id["bad.jsonl:5"]["family"] == "(unreadable)"
    # the untagged image ran, tag prepended, with a warning
    assert by_id["no-tag"]["score"] is not None and "image_tag_added" in by_id["no-tag"]["warning"]
    assert by_id["no-tag"]["visual_tokens"] == by_id[good["id"]]["visual_tokens"] > 0
    assert line["n_warnings"] == 1
    # a text-only item runs in the same batch as image items, with no visual tokens
    assert by_id["text-only"]["visual_tokens"] == 0 and by_id["text-only"]["vision_flops"] == 0
    assert by_id["text-only"]["score"] in (0.0, 1.0)
    hand = hand_summary(rows)
    assert line["per_family"] == pytest.approx(hand["per_family"])
    assert line["easy_mean"] == pytest.approx(hand["easy_mean"]) and line["hard_mean"] == pytest.approx(hand["hard_mean"])
    for ident in expected:  # every skipped item is reported on stderr with its reason
        assert ident in err
    assert [r["id"] for r in rows][:4] == [good["id"], "missing", "truncated", "garbage"]  # file order


def test_unknown_grader_stops_the_run(work, tmp_path):
    good = records(work)[0]
    path = work["data"] / "grader.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "typo", "grader": "exact_mtach"}) + "\n")
    out = tmp_path / "g"
    with pytest.raises(SystemExit, match=r"unknown grader.*typo.*exact_mtach|typo.*unknown grader"):
        main(["eval", "--model", str(work["llava"]), "--data", str(path), "--out", str(out)])
    assert not out.exists()  # stopped before any generation


def test_malformed_json_list_stops_the_run(work, tmp_path):
    path = work["data"] / "broken.json"
    path.write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(SystemExit, match="cannot evaluate"):
        main(["eval", "--model", str(work["llava"]), "--data", str(path), "--out", str(tmp_path / "j")])


def test_usage_errors_are_clear(work, tmp_path):
    with pytest.raises(SystemExit, match="no test.jsonl|no such file"):
        main(["eval", "--model", str(work["llava"]), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="sa_count must be in 0..1"):
        main(["eval", "--model", str(work["visor"]), "--data", "synth", "--n", "1", "--sa-count", "5",
              "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"unknown synth families \['colour'\]; known: .*handwriting, kind_color"):
        main(["eval", "--model", str(work["llava"]), "--data", "synth", "--n", "1", "--families", "colour",
              "--out", str(tmp_path / "o")])


def test_training_only_family_evaluates_when_named(work, capsys, tmp_path):
    line = run_eval(capsys, "--model", str(work["llava"]), "--data", "synth", "--n", "4", "--families",
                    "kind_color", "presence", "--out", str(tmp_path / "o"))
    rows = read_predictions(tmp_path / "o")
    assert [r["family"] for r in rows] == ["kind_color", "presence"] * 2
    assert line["n_items"] == 4 and set(line["per_family"]) == {"kind_color", "presence"}
    assert all(r["difficulty"] == "easy" for r in rows)
    first = run_eval(capsys, "--model", str(work["llava"]), "--data", "synth", "--n", "4", "--families",
                     "kind_color", "presence", "--question-first", "--out", str(tmp_path / "q"))
    assert first["n_items"] == 4
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["data"]["question_first"] is True


# ---------------------------------------------------------------------- library
def test_harness_per_item_configs_and_too_long_prompts(work):
    from visor.cli.eval import load_for_eval
    from visor.eval.harness import evaluate, synth_items
    from visor.processing.processor import VisorProcessor

    model, kind = load_for_eval(str(work["visor"]), torch.float32)
    processor = VisorProcessor.from_pretrained(str(work["visor"]))
    items = synth_items("test", 2, families=["color"])
    configs = {items[0].id: "none", items[1].id: "all"}
    result = evaluate(model, processor.tokenizer, processor.image_processor, items, max_new_tokens=2, progress=False,
                      config_for_item=lambda item: configs[item.id])
    assert [r.active_sa for r in result.items] == ["none", "0"]  # one batch, two configurations
    assert result.items[0].llm_flops < result.items[1].llm_flops
    model.config.text_config.max_position_embeddings = 64  # shorter than any prompt with an image
    result = evaluate(model, processor.tokenizer, processor.image_processor, items, max_new_tokens=2, progress=False)
    assert [r.reason for r in result.items] == ["prompt_too_long"] * 2
    assert result.summary["n_items"] == 2 and result.summary["n_skipped"] == 2 and result.summary["mean_flops"] is None


def test_llava_items_unknown_grader_policy(work):
    from visor.eval.graders import UnknownGraderError
    from visor.eval.harness import llava_items

    path = work["data"] / "grader2.jsonl"
    good = records(work)[0]
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "typo", "grader": "nope"}) + "\n")
    items, report = llava_items(path)  # library default: skipped and counted
    assert [it.reason for it in items] == [None, "unknown_grader"] and report["n_skipped"] == 1
    with pytest.raises(UnknownGraderError, match="typo"):
        llava_items(path, unknown_grader="error")


def test_synth_canvas_defaults_to_the_one_the_model_was_trained_on(tmp_path, capsys):
    """`visor eval --data synth` without --image-size generates the canvas of the model's recipe.json
    (a finished training run writes it beside the weights); --image-size overrides; no recipe: 192."""
    import argparse

    from visor.cli.common import trained_canvas
    from visor.cli.eval import load_items

    model = tmp_path / "final"
    model.mkdir()
    assert trained_canvas(model) is None
    (model / "recipe.json").write_text(json.dumps({"kind": "base", "data": {"synth_image_size": 128}}))
    assert trained_canvas(model) == 128
    args = argparse.Namespace(data="synth", split="val", seed=0, n=3, families=None, image_size=None, model=str(model))
    items, data = load_items(args)
    assert data["synth_config"]["image_size"] == 128 and "trained on" in capsys.readouterr().err
    assert all(item.images[0].size == (128, 128) for item in items)
    args.image_size = 192
    items, data = load_items(args)
    assert data["synth_config"]["image_size"] == 192 and items[0].images[0].size == (192, 192)
    (model / "recipe.json").write_text("{not json")
    assert trained_canvas(model) is None
    # a shipped checkpoint: no recipe.json, the recipe its MANIFEST.json names
    shipped = tmp_path / "checkpoints"
    (shipped / "visor").mkdir(parents=True)
    (shipped / "recipes").mkdir()
    (shipped / "recipes" / "stage2.yaml").write_text("kind: visor-stage2\ndata: {synth_image_size: 128}\n")
    (shipped / "MANIFEST.json").write_text(json.dumps({"checkpoints": {
        "visor": {"path": "visor", "recipe": "recipes/stage2.yaml"}, "base": {"path": "base", "recipe": None}}}))
    assert trained_canvas(shipped / "visor") == 128 and trained_canvas(shipped / "base") is None


def test_worded_scenes_evaluate_without_an_image(work, tmp_path, capsys):
    """`--data words`: the language pre-training's items, graded by exact match, every prediction consistent with
    the summary; an unknown worded family is a usage error."""
    out = tmp_path / "w"
    main(["eval", "--model", str(work["llava"]), "--data", "words", "--n", "6", "--split", "val",
          "--families", "doc", "copy", "--no-progress", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["family"] for r in rows] == ["words_doc", "words_copy"] * 3
    assert all(r["visual_tokens"] in (0, None) and r["prediction"] is not None for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for family in ("words_doc", "words_copy"):
        scores = [r["score"] for r in rows if r["family"] == family]
        assert summary["per_family"][family] == pytest.approx(sum(scores) / len(scores))
    with pytest.raises(SystemExit, match=r"unknown worded families \['code'\]"):
        main(["eval", "--model", str(work["llava"]), "--data", "words", "--families", "code", "--out", str(out)])
