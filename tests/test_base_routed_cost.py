"""``benchmarks/base_routed_cost.py``: the end-to-end cost of a base-routed sample against the baseline and VISOR at
full resolution, from the harness's per-item FLOPs on the shipped checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    return load_benchmark("base_routed_cost")


def test_mix_parsing(script):
    assert script.parse_mix("none=154, 1=14") == {"none": 154, "1": 14}
    for bad in ("none", "none=0", "none=x", ""):
        with pytest.raises(ValueError):
            script.parse_mix(bad)


def test_base_routed_costs_on_the_shipped_checkpoints(script, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert script.main(["--n", "2", "--mix", "none=3,1=1", "--routed-from", "docs/reproduce/reproduce.json",
                        "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cost.json").read_text())
    tiny = report["tiny_flops"]
    # the base view is one of the five crops a 128 px image encodes (2x2 tiles + base view)
    assert tiny["base:none"]["vision"] == pytest.approx(tiny["full:none"]["vision"] / 5)
    assert tiny["base:none"]["routing"] > 0 and tiny["full:none"]["vision"] == pytest.approx(tiny["baseline"]["vision"])
    total = report["tiny_total"]
    assert report["base_routed"]["tiny"] == pytest.approx((3 * total["base:none"] + total["base:1"]) / 4)
    for geometry in ("tiny", "0.5B"):
        savings = report["savings"][geometry]
        assert savings["vs baseline"] > savings["vs VISOR full maximal (0+1+2)"] > savings["vs VISOR full CA-only"] > 1
    assert script.main(["--mix", "none"]) == 2
