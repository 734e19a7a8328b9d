"""The paired bootstrap behind the reproduction's target intervals (visor.eval.stats)."""

import json

import pytest

from visor.eval.stats import GapInterval, paired_gap_interval, read_scores, verdict


def _scores(family_scores: dict[str, list[float]], prefix: str = "i") -> dict[str, tuple[str, float]]:
    return {f"{prefix}-{fam}-{k}": (fam, s) for fam, scores in family_scores.items() for k, s in enumerate(scores)}


def test_identical_and_constant_gaps_have_degenerate_intervals():
    a = _scores({"color": [1, 0, 1, 1, 0], "code": [0, 0, 1, 0, 1]})
    same = paired_gap_interval(a, a, ["color", "code"])
    assert (same.gap, same.low, same.high, same.n_items) == (0.0, 0.0, 0.0, 10)
    ones, zeros = _scores({"color": [1.0] * 8}), _scores({"color": [0.0] * 8})
    full = paired_gap_interval(ones, zeros, ["color"])
    assert (full.gap, full.low, full.high) == (1.0, 1.0, 1.0)


def test_gap_is_a_macro_mean_over_the_requested_families_only():
    """Each family weighs the same whatever its item count, as the table's means do; other families are ignored."""
    a = _scores({"color": [1.0] * 10, "shape": [0.0] * 100, "code": [1.0] * 7})
    b = _scores({"color": [0.0] * 10, "shape": [0.0] * 100, "code": [0.0] * 7})
    iv = paired_gap_interval(a, b, ["color", "shape"])
    assert iv.gap == pytest.approx(0.5) and iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)
    assert iv.n_items == 110


def test_pairing_removes_the_noise_both_methods_share():
    """B = A with 5 of 100 items flipped from right to wrong: the gap is +5 points, and since the two agree on
    every other item the interval stays within a few points of it, although each method alone is a coin toss."""
    import numpy as np

    rng = np.random.default_rng(1)
    base = [float(x) for x in rng.integers(0, 2, 100)]
    right = [k for k, s in enumerate(base) if s == 1][:5]
    worse = [0.0 if k in right else s for k, s in enumerate(base)]
    iv = paired_gap_interval(_scores({"dots": base}), _scores({"dots": worse}), ["dots"])
    assert iv.gap == pytest.approx(0.05)
    assert 0.0 < iv.low <= 0.05 <= iv.high < 0.11
    # the same interval again: deterministic for a seed; another seed moves only the bounds, a little
    assert paired_gap_interval(_scores({"dots": base}), _scores({"dots": worse}), ["dots"]) == iv
    other = paired_gap_interval(_scores({"dots": base}), _scores({"dots": worse}), ["dots"], seed=7)
    assert other.gap == iv.gap and abs(other.low - iv.low) < 0.02


def test_interval_narrows_with_more_items():
    import numpy as np

    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        a = [float(x) for x in rng.random(n) < 0.7]
        b = [float(x) for x in rng.random(n) < 0.5]
        iv = paired_gap_interval(_scores({"chart": a}), _scores({"chart": b}), ["chart"])
        return iv.high - iv.low

    small, large = width(100), width(1600)
    assert 3.0 < small / large < 5.5  # ~sqrt(16) = 4


def test_bad_inputs_are_refused():
    a = _scores({"color": [1.0]})
    with pytest.raises(ValueError, match="no item"):
        paired_gap_interval(a, _scores({"color": [1.0]}, prefix="other"), ["color"])
    with pytest.raises(ValueError, match="is 'color' in one evaluation and 'shape'"):
        paired_gap_interval(a, {"i-color-0": ("shape", 1.0)}, ["color", "shape"])
    with pytest.raises(ValueError, match="level"):
        paired_gap_interval(a, a, ["color"], level=1.0)


def test_verdict_over_intervals():
    iv = lambda low, high: GapInterval((low + high) / 2, low, high, 0.95, 100)  # noqa: E731
    assert verdict([(iv(-1, 3), ">=", -2)]) == "yes"
    assert verdict([(iv(-5, -3), ">=", -2)]) == "no"
    assert verdict([(iv(-3, 1), ">=", -2)]) == "undecided"
    assert verdict([(iv(-12, -6), "<=", -5), (iv(-1, 1), ">=", -2)]) == "yes"
    # one condition surely failing decides the whole target, whatever the other
    assert verdict([(iv(-3, 1), ">=", -2), (iv(-4, 2), "<=", -5)]) == "no"
    with pytest.raises(ValueError, match="op"):
        verdict([(iv(0, 1), ">", 0)])


def test_read_scores_counts_an_unscored_item_as_zero(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "family": "code", "score": 1.0}, {"id": "b", "family": "code", "score": None}]) + "\n")
    assert read_scores(path) == {"a": ("code", 1.0), "b": ("code", 0.0)}


def test_reproduce_targets_carry_intervals_when_predictions_are_there(tmp_path):
    """check_targets with the results folder: every accuracy target gets the interval of each gap it compares
    and a verdict over it; the FLOPs target and a call without the folder get none."""
    from visor.reproduce.report import check_targets

    easy, hard = ["color", "shape", "count", "presence", "side"], ["code", "doc", "chart", "dots", "handwriting"]
    per_item = {  # per family, 40 items: baseline right on 30; CA-only the same on easy, a quarter less per hard item
        "baseline": {**{f: [1.0] * 30 + [0.0] * 10 for f in easy}, **{f: [1.0] * 40 for f in hard}},
        "visor-ca-only": {**{f: [1.0] * 30 + [0.0] * 10 for f in easy}, **{f: [0.75] * 40 for f in hard}},
        "visor-routed": {**{f: [1.0] * 30 + [0.0] * 10 for f in easy}, **{f: [1.0] * 39 + [0.0] for f in hard}},
    }
    rows = []
    (tmp_path / "predictions").mkdir()
    for key, fams in per_item.items():
        path = tmp_path / "predictions" / f"{key}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{f}-{k}", "family": f, "score": s}) + "\n"
                                for f, scores in fams.items() for k, s in enumerate(scores)))
        easy_mean = sum(sum(fams[f]) / len(fams[f]) for f in easy) / 5
        hard_mean = sum(sum(fams[f]) / len(fams[f]) for f in hard) / 5
        rows.append({"key": key, "method": key, "group": "visor", "easy_mean": easy_mean, "hard_mean": hard_mean,
                     "projected_reduction": 9.0, "predictions": f"predictions/{key}.jsonl"})
    targets = {t["target"].split(" within")[0]: t for t in check_targets(rows, tmp_path)}
    ca = targets["VISOR CA-only"]
    assert ca["holds"] is True and ca["with_ci"] == "yes"
    assert ca["ci"] == "easy [+0.0, +0.0], hard [-25.0, -25.0]"
    # routed misses one hard item per family: 2.5 points below, past the 2-point bound, yet within the noise
    routed = targets["VISOR routed"]
    assert routed["holds"] is False and routed["value"] == "easy +0.0, hard -2.5"
    assert routed["with_ci"] == "undecided"
    assert "ci" not in targets["VISOR routed >= 8x FLOPs reduction projected to LLaVA-OV-0.5B"]
    assert all("ci" not in t for t in check_targets(rows))
