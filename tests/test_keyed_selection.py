"""``benchmarks/keyed_selection.py``: answers of the keyed families sorted into right / another candidate / misread."""

from __future__ import annotations

import json

import pytest

from tests.tiny import load_benchmark


def _records(config):
    """Records as ``visor eval`` writes them, from the default test mix (so item families follow the round robin),
    one prediction per kind: the reference, another candidate's value, and a value the image does not hold."""
    from visor.data.synth.generate import generate_items

    script = load_benchmark("keyed_selection")
    records = []
    for item in generate_items("test", 40, config=config):
        if item.family not in script.KEYED_FAMILIES:
            records.append({"id": item.id, "family": item.family, "answer": item.answer, "prediction": "x",
                            "score": 0.0})
            continue
        values = script.candidates(item.scene)
        other = next((v for v in values if v != item.answer), None)
        for prediction in (item.answer, other, "zzz"):
            if prediction is not None:
                records.append({"id": item.id, "family": item.family, "answer": item.answer,
                                "prediction": prediction, "score": float(prediction == item.answer)})
    return records


def test_answers_are_sorted_by_where_they_come_from():
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_items

    script = load_benchmark("keyed_selection")
    config = DEFAULT_CONFIG.with_image_size(128)
    records = _records(config)
    table = script.classify(records, config)
    scenes = {it.id: it.scene for it in generate_items("test", 40, config=config)}
    assert set(table) == {"doc", "chart"}  # the default mix holds no training-only family
    for family, row in table.items():
        keyed = [r for r in records if r["family"] == family]
        assert row["n"] == len(keyed)
        others = sum(r["prediction"] not in (r["answer"], "zzz") for r in keyed)
        assert row["right"] == pytest.approx(sum(r["score"] for r in keyed) / len(keyed))
        assert row["other_candidate"] == pytest.approx(others / len(keyed))
        assert row["neither"] == pytest.approx(sum(r["prediction"] == "zzz" for r in keyed) / len(keyed))
        picks = []
        for r in keyed:
            values = script.candidates(scenes[r["id"]])
            picks.append(values.count(r["answer"]) / len(values))  # a repeated value counts each time
        assert row["uniform_pick"] == pytest.approx(sum(picks) / len(picks))
        assert 1 / 4 <= min(picks) and max(picks) <= 1  # 2-4 candidates, the reference among them


def test_kind_color_candidates_and_a_wrong_canvas_is_refused():
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_items

    script = load_benchmark("keyed_selection")
    config = DEFAULT_CONFIG.with_image_size(128)
    items = list(generate_items("val", 6, config=config, families=["kind_color"]))
    records = [{"id": it.id, "family": it.family, "answer": it.answer, "prediction": it.answer, "score": 1.0}
               for it in items]
    row = script.classify(json.loads(json.dumps(records)), config)["kind_color"]
    assert row["right"] == 1.0 and row["n"] == 6
    assert row["uniform_pick"] == pytest.approx(sum(1 / len(it.scene["shapes"]) for it in items) / 6)
    with pytest.raises(ValueError, match="--image-size"):
        script.classify(records, DEFAULT_CONFIG)  # made at 128 px, regenerated at 192: shapes differ
    with pytest.raises(ValueError, match="not a procedural item id"):
        script.parse_item_id("doc-7")


def test_cli_names_repeated_file_names_by_folder(tmp_path, monkeypatch, capsys):
    from visor.data.synth.config import DEFAULT_CONFIG

    script = load_benchmark("keyed_selection")
    records = _records(DEFAULT_CONFIG.with_image_size(128))
    for run in ("run-a", "run-b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = [str(tmp_path / run / "predictions.jsonl") for run in ("run-a", "run-b")]
    monkeypatch.setattr("sys.argv", ["keyed_selection.py", *paths, "--image-size", "128"])
    script.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("run-a/predictions.jsonl") for line in lines)
    assert any(line.startswith("run-b/predictions.jsonl") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["image_size"] == 128 and set(summary["results"]) == set(paths)
