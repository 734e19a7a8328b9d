"""Graders accept right answers, reject wrong ones, and handle the ANLS / relaxed-accuracy edge cases."""

from __future__ import annotations

import pytest

from visor.eval.graders import (
    ScoredItem,
    UnknownGraderError,
    aggregate,
    anls,
    exact_match,
    get_grader,
    grade,
    grader_names,
    levenshtein,
    multiple_choice,
    normalize_answer,
    parse_number,
    register_grader,
    relaxed_accuracy,
    yes_no,
)


def test_normalisation_follows_vqa():
    assert normalize_answer("  The Red. ") == "red"
    assert normalize_answer("an apple!") == "apple"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("left\n") == "left"


def test_exact_match():
    assert exact_match("Red", "red") == 1.0
    assert exact_match("the square.", "square") == 1.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("ACE", "ace") == 1.0
    assert exact_match("green", "red") == 0.0
    assert exact_match("ACX", "ACE") == 0.0
    assert exact_match("12", ["10", "12"]) == 1.0
    # one-letter answers that are articles do not collapse to the empty string
    assert exact_match("", "A") == 0.0
    assert exact_match("a", "A") == 1.0
    assert exact_match("B", "A") == 0.0


def test_levenshtein():
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("ACEH", "ACEX") == 1


def test_anls_edge_cases():
    assert anls("ACEH", "ACEH") == 1.0
    assert anls(" aceh ", "ACEH") == 1.0  # case and surrounding space do not count
    assert anls("ACEX", "ACEH") == pytest.approx(0.75)
    # normalised distance exactly 0.5 -> 0 (DocVQA: similarity counted only when NL < 0.5)
    assert anls("AC", "ACEH") == 0.0
    assert anls("47", "48") == 0.0
    assert anls("ACE", "ACEH") == pytest.approx(0.75)
    assert anls("", "ACEH") == 0.0
    assert anls("", "") == 1.0
    assert anls("ACEH", ["zzzz", "ACEX"]) == pytest.approx(0.75)  # max over references
    assert anls("abc", "abd", threshold=0.3) == 0.0  # 1/3 >= 0.3


def test_edit_similarity_is_unthresholded_anls():
    from visor.eval.graders import edit_similarity

    assert edit_similarity("KKA", "KKA") == 1.0
    assert edit_similarity("KKN", "KKA") == pytest.approx(2 / 3)
    assert edit_similarity("KN", "KKA") == pytest.approx(1 / 3)  # below ANLS's cut-off: ANLS gives 0
    assert anls("KN", "KKA") == 0.0
    assert edit_similarity("zzz", ["KKA", "zzA"]) == pytest.approx(2 / 3)  # the closest reference
    assert edit_similarity("abc", "xyz") == 0.0


def test_parse_number():
    assert parse_number("42") == 42.0
    assert parse_number(" -3.5 ") == -3.5
    assert parse_number("1,234") == 1234.0
    assert parse_number("45%") == pytest.approx(0.45)
    assert parse_number("abc") is None
    assert parse_number("nan") is None


def test_relaxed_accuracy_edge_cases():
    assert relaxed_accuracy("47", "47") == 1.0
    assert relaxed_accuracy("49", "47") == 1.0  # 4.3% off
    assert relaxed_accuracy("50", "47") == 0.0  # 6.4% off
    assert relaxed_accuracy("105", "100") == 1.0  # exactly 5% counts
    assert relaxed_accuracy("105.1", "100") == 0.0
    # negatives: tolerance is relative to |target|
    assert relaxed_accuracy("-10.4", "-10") == 1.0
    assert relaxed_accuracy("10", "-10") == 0.0
    # zero target: only an exact zero
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 1.0
    assert relaxed_accuracy("0.001", "0") == 0.0
    # percentages (ChartQA divides by 100)
    assert relaxed_accuracy("45%", "0.45") == 1.0
    assert relaxed_accuracy("45%", "45%") == 1.0
    assert relaxed_accuracy("45", "45%") == 0.0
    # non-numbers: exact, case-insensitive
    assert relaxed_accuracy("Blue", "blue") == 1.0
    assert relaxed_accuracy("blue", "red") == 0.0
    assert relaxed_accuracy("forty", "40") == 0.0


def test_yes_no_and_choice():
    assert yes_no("Yes", "yes") == 1.0
    assert yes_no("yes, there is.", "yes") == 1.0
    assert yes_no("No.", "no") == 1.0
    assert yes_no("no", "yes") == 0.0
    assert yes_no("", "yes") == 0.0
    assert yes_no("maybe yes", "yes") == 0.0
    assert multiple_choice("(B) cat", "B") == 1.0
    assert multiple_choice("b. cat", "B") == 1.0
    assert multiple_choice("C", "B") == 0.0
    assert multiple_choice("", "B") == 0.0


def test_registry():
    assert {"exact", "anls", "relaxed", "yesno", "choice"} <= set(grader_names())
    assert get_grader("anls") is anls
    assert grade("relaxed", "49", "47") == 1.0
    with pytest.raises(UnknownGraderError) as exc:
        get_grader("bleu")
    assert "unknown grader 'bleu'" in str(exc.value) and "anls" in str(exc.value)
    with pytest.raises(KeyError):  # UnknownGraderError is a KeyError
        grade("nope", "a", "a")
    with pytest.raises(ValueError):
        register_grader("exact")(lambda p, a: 0.0)


def test_aggregate_means_and_skipped_items():
    items = [
        ScoredItem("color", "easy", 1.0), ScoredItem("color", "easy", 0.0),
        ScoredItem("side", "easy", 1.0),
        ScoredItem("code", "hard", 0.5), ScoredItem("code", "hard", None),  # skipped counts as 0
        {"family": "dots", "difficulty": "hard", "score": 1.0},
    ]
    out = aggregate(items)
    assert out["per_family"] == {"code": 0.25, "color": 0.5, "dots": 1.0, "side": 1.0}
    assert out["per_family_n"]["code"] == 2
    assert out["easy_mean"] == pytest.approx(0.75)  # macro over families: (0.5 + 1.0) / 2
    assert out["hard_mean"] == pytest.approx(0.625)
    assert out["overall_mean"] == pytest.approx((0.25 + 0.5 + 1.0 + 1.0) / 4)
    assert out["n_items"] == 6 and out["n_skipped"] == 1
    empty = aggregate([])
    assert empty["easy_mean"] is None and empty["n_items"] == 0
    with pytest.raises(ValueError):
        aggregate([ScoredItem("x", "easy", 1.0), ScoredItem("x", "hard", 1.0)])
