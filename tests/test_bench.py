"""``visor bench`` plumbing on a tiny geometry (the real 0.5B benchmark is a CLI run, not a test).

Timings are not asserted; what is: the synthetic decode cache has a real prefill's shape per layer kind,
the whole pipeline runs and writes its CSV/JSON/PNG and a final JSON line, interrupted runs keep their
finished rows, the targets are read off the right row, and bad input fails clearly.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.tiny import tiny_llava_config
from visor.bench import models as bench_models
from visor.bench.models import BenchConfig, build_models, prompt_ids, synthetic_cache, visual_features
from visor.bench.report import check_targets
from visor.bench.runner import run_bench


@pytest.fixture()
def tiny_geometry(tmp_path, monkeypatch):
    """Register a 'tiny' geometry (9 layers, 3 SA slots) whose config.json lives in tmp_path."""
    folder = tmp_path / "tiny-config"
    tiny_llava_config(num_layers=9, heads=4, kv_heads=2, hidden=32).save_pretrained(str(folder))
    real = bench_models.config_path
    monkeypatch.setattr(bench_models, "config_path", lambda name: str(folder / "config.json") if name == "tiny" else real(name))
    return "tiny"


@pytest.mark.parametrize("active", [None, [], [1]])
def test_synthetic_cache_matches_a_real_prefill(tiny_geometry, active):
    models = build_models(tiny_geometry, torch.float32)
    model = models.baseline if active is None else models.visor
    n_visual, n_text, batch = 20, 18, 3
    with torch.no_grad():
        real = model(prompt_ids(model, n_visual, n_text, batch), image_features=visual_features(model, n_visual, batch),
                     active_sa=active, use_cache=True, logits_to_keep=1).past_key_values
    fake = synthetic_cache(model, real.kinds, batch, n_visual, n_text)
    assert fake.num_bytes_by_kind() == real.num_bytes_by_kind()
    for a, b in zip(real.self_kv + real.cross_kv, fake.self_kv + fake.cross_kv):
        assert (a.key is None) == (b.key is None)
        if a.key is not None:
            assert a.key.shape == b.key.shape and a.value.shape == b.value.shape
    assert torch.equal(fake.next_position, real.next_position)
    with torch.no_grad():  # decodes like the real one
        out = model(torch.zeros(batch, 1, dtype=torch.long), attention_mask=torch.ones(batch, 1, dtype=torch.long),
                    past_key_values=fake, logits_to_keep=1)
    assert out.logits.shape == (batch, 1, model.config.text_config.vocab_size)


def test_baseline_shares_the_visor_weights(tiny_geometry):
    models = build_models(tiny_geometry, torch.float32)
    assert models.baseline.language_model is models.visor.language_model
    assert models.baseline.plan.cross_attention_layers == () and models.baseline.plan.num_slots == 9
    assert models.visor.plan.num_slots == 3
    assert models.visor.lm_head.weight is models.visor.language_model.embed_tokens.weight or not models.visor.config.tie_word_embeddings
    assert BenchConfig("x", "", sa_count=2).active(models.visor.plan) == (0, 1)


def test_bench_runs_end_to_end_on_a_tiny_geometry(tiny_geometry, tmp_path, capsys):
    out = tmp_path / "bench"
    summary = run_bench(geometry=tiny_geometry, dtype="fp32", out=out, rows=["base", "384x384"], repeats=2,
                        decode_tokens=2, decode_batches=(1, 4), memory=False, quick=True, threads=1, profile=True, peak_shapes=((256, 256, 256),), log=lambda *_: None)
    assert summary["rows"] > 0 and not summary["interrupted"]
    rows = list(csv.DictReader(open(out / "rows.csv")))
    assert len(rows) == summary["rows"]
    configs = {r["config"] for r in rows}
    assert {"baseline", "visor-ca", "visor-2sa"} <= configs
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["machine"]["threads"] == 1 and results["meta"]["machine"]["threads_choice"] == "as given"
    for r in results["rows"]:
        assert r["prefill_s"] > 0 and r["decode_b1_s"] > 0 and r["decode_b4_s"] > 0
        assert r["kv_bytes"] > 0 and 0 < r["analytic_speedup"]
        if r["config"] == "baseline":
            assert r["speedup"] == 1.0 and r["kv_ratio"] == 1.0
        if r["config"] == "visor-ca":
            assert r["analytic_speedup"] > 1 and r["kv_ratio"] < 1
    assert (out / "speedup.png").stat().st_size > 0
    shares = results["meta"]["profile"]["baseline"]["shares"]
    assert shares["matmul (mm/addmm/bmm)"] > 0 and abs(sum(shares.values()) - 1) < 0.01
    assert "self CPU time by kernel class" in (out / "profile_visor-ca.txt").read_text()
    assert "prefill ms" in capsys.readouterr().out


def test_interrupted_bench_keeps_finished_rows(tiny_geometry, tmp_path, monkeypatch):
    from visor.bench import runner

    calls = {"n": 0}
    real = runner.measure_row

    def measure_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "measure_row", measure_then_interrupt)
    out = tmp_path / "bench"
    summary = run_bench(geometry=tiny_geometry, dtype="fp32", out=out, rows=["base", "384x384"], repeats=1,
                        decode_tokens=1, decode_batches=(1,), memory=False, configs=["baseline", "visor-ca"],
                        peak_shapes=((256, 256, 256),), log=lambda *_: None)
    assert summary["interrupted"] and summary["rows"] == 2
    assert len(list(csv.DictReader(open(out / "rows.csv")))) == 2
    assert json.loads((out / "results.json").read_text())["meta"]["interrupted"]


@pytest.mark.timeout(300)
def test_memory_row_runs_in_a_forked_child(tiny_geometry):
    from visor.bench.memory import peak_rss, run_row_in_child

    models = build_models(tiny_geometry, torch.float32)
    row = {"config": {"name": "visor-ca", "label": "", "sa_count": 0}, "n_visual": 16, "n_text": 20, "image_size": None}
    result = run_row_in_child(models, row)
    assert "error" not in result, result
    assert result["peak_rss_bytes"] >= result["model_rss_bytes"] > 0 and result["kv_bytes"] > 0
    assert result["peak_rss_bytes"] <= peak_rss() + 2**30  # the child's own counter, not the whole test session's
    bad = run_row_in_child(models, {**row, "config": {"name": "x", "label": "", "sa_count": 99}})
    assert "error" in bad


def test_targets_are_read_at_7371_tokens():
    def row(config, speedup, analytic, kv=0.4, b16=1.5, frac=0.5):
        return {"image": "1152x1152", "config": config, "speedup": speedup, "analytic_speedup": analytic,
                "kv_ratio": kv, "decode_b16_speedup": b16, "decode_b1_speedup": 1.0, "fraction_of_peak": frac}

    rows = [row("baseline", 1, 1), row("visor-ca", 20, 110), row("visor-2sa", 8, 10.9), row("visor-4sa", 3, 5.7)]
    targets = check_targets(rows, {"dtype": "bf16"})
    assert targets["prefill"]["visor-ca"]["met"] and targets["prefill"]["visor-2sa"]["met"]
    assert not targets["prefill"]["visor-4sa"]["met"]
    assert targets["kv_ratio_2sa"]["met"] and targets["decode_b16_speedup_2sa"]["met"]
    assert targets["baseline_fraction_of_peak"]["met"]
    assert check_targets([row("baseline", 1, 1) | {"image": "base"}], {}) == {"row": "1152x1152", "measured": False}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--geometry", "llava-ov-7b"], "unknown geometry"),
        (["--rows", "999x999"], "unknown image row"),
        (["--configs", "visor-99sa"], "unknown configuration"),
        (["--text-tokens", "0"], "text-tokens"),
        (["--threads", "0"], "threads"),
        (["--decode-batches", "1,x"], "decode-batches"),
        (["--reduce", "visionzip:0"], "kept fraction"),
        (["--reduce", "nosuch:2x"], "unknown reducer"),
    ],
)
def test_cli_bad_input(argv, message, tmp_path, capsys):
    from visor.cli.main import main

    assert main(["bench", "--out", str(tmp_path / "b"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fast, expected", [(True, "bf16"), (False, "fp32")])
def test_cli_dtype_auto_follows_the_machine(fast, expected, tmp_path, monkeypatch):
    """--dtype auto (the default) runs bf16 only where it is native (AMX or a GPU); an explicit dtype is kept."""
    import visor.bench.runner as runner
    import visor.precision as precision
    from visor.cli.main import main

    seen = []
    monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": fast)
    monkeypatch.setattr(runner, "run_bench", lambda **kwargs: seen.append(kwargs["dtype"]) or {})
    monkeypatch.setattr(runner, "dump_json", lambda summary: "{}")
    assert main(["bench", "--out", str(tmp_path / "b")]) == 0
    assert main(["bench", "--out", str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    assert seen == [expected, "bf16"]


def test_bench_is_registered_and_documented():
    from visor.cli.main import VERB_MODULES, build_parser

    assert "bench" in VERB_MODULES
    sub = build_parser()._subparsers._group_actions[0].choices["bench"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, action.dest


REDUCER_NAMES = ("pooling-matched", "visionzip-matched", "vispruner-matched", "hired-matched", "fastv", "pdrop",
                 "visor-2sa+visionzip", "visor-2sa+vispruner")


def test_every_reducer_has_a_row_at_a_stated_budget():
    from visor.bench.models import MATCHED_KEEP_2SA, llm_configs

    configs = {c.name: c for c in llm_configs(8)}
    for name in ("visor-tr2x", "visor-tr4x", *REDUCER_NAMES):
        assert configs[name].reducer, name
    for name in ("pooling", "visionzip", "vispruner", "hired"):  # peers on the baseline at the matched budget
        c = configs[f"{name}-matched"]
        assert c.baseline and c.reducer == f"{name}:{MATCHED_KEEP_2SA}" and "matched" in c.label
    assert configs["fastv"].baseline and "published default" in configs["fastv"].label
    assert configs["visor-2sa+visionzip"].sa_count == 2 and not configs["visor-2sa+visionzip"].baseline


def test_matched_budget_matches_visor_2sa_flops():
    from visor.bench.models import MATCHED_KEEP_2SA
    from visor.cost import count_baseline_prefill, count_prefill, get_geometry
    from visor.model.plan import LayerPlan

    g = get_geometry("llava-ov-0.5b")
    plan = LayerPlan.default(g.text.num_layers)
    two = count_prefill(g, plan, plan.first_slots(2), 7290, 64).llm_total
    peer = count_baseline_prefill(g, round(7290 * MATCHED_KEEP_2SA), 64).llm_total
    assert abs(peer / two - 1) < 0.01


def _meta_models(geometry="llava-ov-0.5b"):
    """Real-geometry models on the meta device: enough for the analytic numbers, no memory."""
    import copy

    from visor.bench.models import BenchModels, config_path
    from visor.convert.llava_onevision import convert_llava_onevision
    from visor.model.plan import LayerPlan

    model = convert_llava_onevision(config_path(geometry), device="meta", dtype=torch.bfloat16)
    baseline = copy.copy(model)
    baseline.config = copy.deepcopy(model.config)
    baseline.config.set_plan(LayerPlan.all_self_attention(model.config.text_config.num_hidden_layers))
    return BenchModels(model, baseline, torch.bfloat16, torch.device("cpu"), geometry)


@pytest.mark.parametrize("name", REDUCER_NAMES + ("visor-tr2x",))
def test_analytic_ratio_agrees_with_visor_cost_reduce(name, capsys):
    from visor.bench.models import llm_configs
    from visor.bench.runner import analytic_row
    from visor.cli.main import main

    config = {c.name: c for c in llm_configs(8)}[name]
    models = _meta_models()
    base = analytic_row(models, llm_configs(8)[0], 7371, 64, 10, (1152, 1152))
    row = analytic_row(models, config, 7371, 64, 10, (1152, 1152))
    argv = ["cost", "--visual-tokens", "7371", "--text-tokens", "64", "--crops", "10", "--reduce", config.reducer]
    if not config.baseline:
        argv += ["--sa-count", str(config.sa_count)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = report["reducer_reduction"] if config.baseline else report["reduction"]
    assert base["flops"] / row["flops_with_selection"] == pytest.approx(expected, rel=1e-9)
    assert row["flops_with_selection"] - row["flops"] == row["selection_flops"] == report["reduce"]["selection_flops"]
    assert row["visual_tokens_entering_llm"] == report["reduce"]["visual_tokens_per_layer"][0]


def test_bench_runs_every_reducer_row(tiny_geometry, tmp_path, capsys):
    out = tmp_path / "bench"
    summary = run_bench(geometry=tiny_geometry, dtype="fp32", out=out, rows=["384x384"], repeats=1, decode_tokens=1,
                        decode_batches=(1,), memory=False, threads=1, configs=["baseline", *REDUCER_NAMES],
                        peak_shapes=((256, 256, 256),), extra_reducers=("visionzip:0.5",), log=lambda *_: None)
    results = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in results["rows"]}
    assert set(REDUCER_NAMES) <= set(rows)
    for name in REDUCER_NAMES:
        r = rows[name]
        assert r["prefill_s"] > 0 and r["selection_s"] is not None and r["selection_s"] >= 0
        assert r["analytic_speedup"] > 1 and r["visual_tokens_entering_llm"] <= r["visual_tokens"]
    assert rows["fastv"]["visual_tokens_entering_llm"] == rows["fastv"]["visual_tokens"]  # prunes inside the LLM
    printed = capsys.readouterr().out
    for name in REDUCER_NAMES:
        assert f"selection overhead 384x384 {name} " in printed
    assert "selection_s" in open(out / "rows.csv").readline()
    assert summary["rows"] == len(REDUCER_NAMES) + 1


def test_reducer_targets_are_reported_per_reducer():
    rows = [{"image": "1152x1152", "config": "baseline", "speedup": 1, "analytic_speedup": 1, "kv_ratio": 1,
             "fraction_of_peak": 0.5},
            {"image": "1152x1152", "config": "fastv", "reducer": "fastv", "speedup": 1.5, "analytic_speedup": 2.3,
             "kv_ratio": 0.7, "fraction_of_peak": 0.5, "selection_s": 0.01},
            {"image": "1152x1152", "config": "visor-2sa+visionzip", "reducer": "visionzip", "speedup": 40,
             "analytic_speedup": 45, "kv_ratio": 0.1, "fraction_of_peak": 0.5, "selection_s": 0.2}]
    targets = check_targets(rows, {"dtype": "bf16"})
    assert not targets["reducers"]["fastv"]["met"] and targets["reducers"]["visor-2sa+visionzip"]["met"]
    assert "visor-2sa+visionzip" not in targets["prefill"]


def test_prefill_batch_times_several_prompts_and_drops_reducer_rows(tiny_geometry, tmp_path):
    out = tmp_path / "bench"
    summary = run_bench(geometry=tiny_geometry, dtype="fp32", out=out, rows=["384x384"], repeats=1, decode_tokens=1,
                        decode_batches=(1,), memory=True, threads=1, prefill_batch=3, peak_shapes=((256, 256, 256),),
                        log=lambda *_: None)
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["prefill_batch"] == 3 and "need batch 1" in results["meta"]["reducer_rows"]
    rows = {r["config"]: r for r in results["rows"]}
    assert all(r["reducer"] is None and r["prefill_batch"] == 3 for r in rows.values())
    assert {"baseline", "visor-ca"} <= set(rows) and summary["rows"] == len(rows)
    # KV bytes are per sample, so they match the analytic count of one prompt whatever the batch
    for r in rows.values():
        assert r["kv_bytes"] == r["kv_bytes_analytic"]
        assert r["achieved_flops_per_s"] == pytest.approx(3 * r["flops_executed"] / r["prefill_s"])
    assert "batch 3" in (out / "table.txt").read_text()
    with pytest.raises(ValueError, match="prefill-batch must be positive"):
        run_bench(geometry=tiny_geometry, out=tmp_path / "x", prefill_batch=0, log=lambda *_: None)
