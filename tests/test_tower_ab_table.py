"""``benchmarks/tower_ab_table.py``: the side-by-side validation table of runs, from their metrics files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tower_ab_table.py"
_spec = importlib.util.spec_from_file_location("tower_ab_table", _PATH)
tower_ab_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tower_ab_table)


def _write(path: Path, evals: list[tuple[int, float, dict]], speeds: list[float]) -> Path:
    rows = [{"step": 10 * (i + 1), "loss": 1.0, "samples_per_s": s} for i, s in enumerate(speeds)]
    rows += [{"step": step, "eval": {"per_family": families, "easy_mean": easy, "hard_mean": 0.25, "n_items": 4}}
             for step, easy, families in evals]
    rows.append({"step": 99, "eval": {"glyph_acc": 0.9}})  # a vision run's evaluation: not a family table
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_one_row_per_run_and_evaluation_with_every_family_and_the_median_speed(tmp_path):
    a = _write(tmp_path / "a.jsonl", [(250, 0.5, {"shape": 0.4, "code": 0.0})], [10.0, 30.0, 20.0])
    b = _write(tmp_path / "b.jsonl", [(250, 0.6, {"shape": 0.76}), (500, 0.7, {"shape": 0.78})], [5.0])
    text = tower_ab_table.table({"A": a, "B": b})
    lines = text.splitlines()
    assert lines[0] == "| run | step | items | easy | hard | code | shape |"
    assert "| A | 250 | 4 | 50.0 | 25.0 | 0 | 40 |" in lines
    assert "| B | 250 | 4 | 60.0 | 25.0 |  | 76 |" in lines  # a family the run never evaluated stays empty
    assert "| B | 500 | 4 | 70.0 | 25.0 |  | 78 |" in lines
    assert "- A: median 20.0 samples/s over 3 logged windows" in lines
    assert "- B: median 5.0 samples/s over 1 logged windows" in lines


def test_names_must_match_the_files_and_the_files_must_exist(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [], [])
    with pytest.raises(SystemExit):
        tower_ab_table.main([str(a), "--names", "A", "B"])
    assert "1 metrics files but 2 names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tower_ab_table.main([str(tmp_path / "missing.jsonl")])
    assert "no such metrics file" in capsys.readouterr().err
