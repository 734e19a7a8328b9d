"""lmms-eval plugin end to end: lmms-eval's own API drives ``--model visor`` on a tiny checkpoint, and its
answers, scores and FLOPs match ``visor eval`` on the same items.

lmms-eval lives in its own environment (``.venv-lmms``, built by ``scripts/setup_lmms_env.sh``, which the
README's install line and ``.ci/run`` run; ``VISOR_LMMS_VENV`` points elsewhere): lmms-eval 0.7.3's full
dependency set (torchvision, ...) breaks the CPU torch build of the main environment. This test runs
``tests/lmms/driver.py`` there in a subprocess, and FAILS when the environment is missing.

The driver goes through lmms-eval's registry (the ``lmms_eval.models`` entry point declared in
pyproject.toml), a ``TaskManager`` with a task folder written here (a generation task graded like the
synth benchmark, and a multiple-choice task for ``loglikelihood``), and ``simple_evaluate``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_benchmark_llava, tiny_image_processor
from visor.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
LMMS_VENV = Path(os.environ.get("VISOR_LMMS_VENV", ROOT / ".venv-lmms"))
LMMS_PY = LMMS_VENV / "bin" / "python"
N_LAYERS = 6

GEN_TASK = """\
task: visor_synth_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function visor_task_utils.doc_to_visual
doc_to_text: !function visor_task_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
  until: ["<|im_end|>"]
process_results: !function visor_task_utils.process_results
metric_list:
  - metric: visor_score
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """\
task: visor_synth_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function visor_task_utils.doc_to_visual
doc_to_text: !function visor_task_utils.doc_to_text
doc_to_choice: choices
doc_to_target: 0
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
from PIL import Image

from visor.eval.graders import grade


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"visor_score": grade(doc["grader"], results[0], [doc["answer"]])}
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    llava, tok, config = tiny_benchmark_llava(N_LAYERS, seed=1)
    llava_dir, visor_dir, data = root / "llava", root / "visor", root / "data"
    llava.save_pretrained(str(llava_dir))
    tok.save_pretrained(str(llava_dir))
    tiny_image_processor(config).save_pretrained(str(llava_dir))
    assert main(["convert", str(llava_dir), str(visor_dir)]) == 0
    assert main(["data", "synth", "--out", str(data), "--split", "test", "--n", "6", "--families", "color", "code",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    docs = []
    for k, rec in enumerate(records):
        question = rec["conversations"][0]["value"]
        assert question.startswith("<image>\n")
        answer = rec["conversations"][1]["value"]
        docs.append({"id": rec["id"], "image": str((data / rec["image"]).resolve()), "question": question[len("<image>\n"):],
                     "answer": answer, "grader": rec["grader"], "family": rec["family"],
                     # a long decoy (less likely) or a one-character one (likelier): acc is neither 0 nor 1
                     "choices": [answer, "zz " + answer[::-1] if k % 2 else answer[:1]]})
    task_dir = root / "tasks"
    task_dir.mkdir()
    docs_file = task_dir / "docs.jsonl"
    docs_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "visor_synth_gen.yaml").write_text(GEN_TASK.format(data=docs_file))
    (task_dir / "visor_synth_mc.yaml").write_text(MC_TASK.format(data=docs_file))
    (task_dir / "visor_task_utils.py").write_text(TASK_UTILS)
    return {"root": root, "visor": visor_dir, "data": data, "docs": docs, "task_dir": task_dir}


def run_driver(work, model_args: str, tasks: list[str], check_ll: dict | None = None, batch_size: int = 4) -> dict:
    assert LMMS_PY.exists(), (
        f"the lmms-eval test environment is missing ({LMMS_VENV}); build it with 'bash scripts/setup_lmms_env.sh' "
        f"(the README's install line and .ci/run do)")
    spec = {"model_args": model_args, "task_dir": str(work["task_dir"]), "tasks": tasks, "batch_size": batch_size,
            "check_loglikelihood": check_ll}
    spec_file = work["root"] / f"spec-{'-'.join(tasks)}.json"
    out_file = work["root"] / f"out-{'-'.join(tasks)}.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    hf_home = work["root"] / "hf"
    env.update(HF_HOME=str(hf_home), HF_DATASETS_CACHE=str(hf_home / "datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(work["task_dir"]))
    proc = subprocess.run([str(LMMS_PY), str(ROOT / "tests" / "lmms" / "driver.py"), str(spec_file), str(out_file)],
                          cwd=str(work["root"]), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"lmms-eval driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out_file.read_text())


def test_generate_until_matches_visor_eval(work, capsys, tmp_path):
    """simple_evaluate(model='visor', ...) on a local task == 'visor eval' on the same items: answers,
    per-item scores, the task mean, and the mean LLM prefill FLOPs per sample."""
    flops_file = tmp_path / "flops.json"
    out = run_driver(work, f"pretrained={work['visor']},active_sa=1,flops_out={flops_file}", ["visor_synth_gen"])
    assert out["manifest"] == {"model_id": "visor", "simple_class_path": "visor.lmms.model.Visor"}
    assert out["class"] == "visor.lmms.model.Visor"

    eval_out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--max-new-tokens", "3", "--model", str(work["visor"]), "--data",
                 str(work["data"]), "--active-sa", "1", "--batch-size", "4", "--out", str(eval_out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(r) for r in (eval_out / "predictions.jsonl").read_text().splitlines()]

    samples = sorted(out["samples"]["visor_synth_gen"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [r["id"] for r in rows]
    lmms_answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
                    for s in samples]
    assert lmms_answers == [r["prediction"] for r in rows]
    scores = [r["score"] for r in rows]
    metric = out["results"]["visor_synth_gen"]["visor_score,none"]
    assert metric == pytest.approx(sum(scores) / len(scores))
    assert line["n_items"] == len(rows) == 6 and line["n_skipped"] == 0

    report = json.loads(flops_file.read_text())
    assert report["summary"]["n_samples"] == 6
    assert report["summary"]["mean_llm_flops"] == pytest.approx(line["mean_flops"])
    assert report["summary"]["active_sa_counts"] == {"1": 6}
    by_doc = {s["doc_id"]: s["llm_flops"] for s in report["samples"]}
    assert [by_doc[i] for i in range(6)] == pytest.approx([r["llm_flops"] for r in rows])


def test_loglikelihood_multiple_choice(work, tmp_path):
    """A multiple-choice task goes through loglikelihood (batched): each choice's negative log-likelihood
    equals an unbatched forward pass's, and lmms-eval's acc is what those numbers imply."""
    docs = work["docs"]
    check = {"pretrained": str(work["visor"]), "active_sa": "0+1", "delimiter": " ",
             "docs": [{"image": d["image"], "question": d["question"], "choices": d["choices"]} for d in docs]}
    flops_file = tmp_path / "flops.json"
    out = run_driver(work, f"pretrained={work['visor']},active_sa=0+1,flops_out={flops_file}", ["visor_synth_mc"],
                     check_ll=check, batch_size=3)
    samples = sorted(out["samples"]["visor_synth_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    got = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert len(got[0]) == 2
    for mine, ref in zip(got, out["recomputed"]):  # lmms-eval wants a loss (it takes the argmin): -log p
        assert mine == pytest.approx([-x for x in ref], abs=1e-4)
    acc = sum(row[0] > row[1] for row in out["recomputed"]) / len(docs)
    assert 0 < acc < 1 or len(docs) < 4  # both outcomes occur, so acc checks the choice, not a constant
    assert out["results"]["visor_synth_mc"]["acc,none"] == pytest.approx(acc)
    report = json.loads(flops_file.read_text())
    assert report["summary"]["n_samples"] == len(docs) and report["summary"]["active_sa_counts"] == {"0+1": 2 * len(docs)}


def test_resolution_router_routes_on_request_in_both_request_kinds(work, capsys, tmp_path):
    """A checkpoint whose router also picks the resolution: with a large budget every sample runs on its base
    view (no tile encoded); generation equals `visor eval --resolution base` and the log-likelihoods equal a
    plain base-layout forward; the FLOPs report records the resolution and the routing pass."""
    from visor import VisorForConditionalGeneration
    from visor.model.resolution import BASE, FULL, Configuration
    from visor.processing.processor import VisorProcessor
    from visor.routing.router import attach_router

    model = VisorForConditionalGeneration.from_pretrained(str(work["visor"]))
    attach_router(model, [Configuration((), BASE), Configuration(model.plan.all_slots, FULL)])
    routed_dir = tmp_path / "routed"
    model.save_pretrained(str(routed_dir))
    VisorProcessor.from_pretrained(str(work["visor"])).save_pretrained(str(routed_dir))
    docs = work["docs"]
    check = {"pretrained": str(routed_dir), "active_sa": "none", "delimiter": " ", "resolution": "base",
             "docs": [{"image": d["image"], "question": d["question"], "choices": d["choices"]} for d in docs]}
    flops_file = tmp_path / "flops.json"
    out = run_driver(work, f"pretrained={routed_dir},budget=1e6,flops_out={flops_file}",
                     ["visor_synth_gen", "visor_synth_mc"], check_ll=check, batch_size=3)

    capsys.readouterr()
    assert main(["eval", "--no-progress", "--max-new-tokens", "3", "--model", str(routed_dir), "--data", str(work["data"]),
                 "--active-sa", "none", "--resolution", "base", "--batch-size", "4", "--out", str(tmp_path / "eval")]) == 0
    rows = [json.loads(r) for r in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["visor_synth_gen"], key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert answers == [r["prediction"] for r in rows]
    mc = sorted(out["samples"]["visor_synth_mc"], key=lambda s: s["doc_id"])
    for sample, ref in zip(mc, out["recomputed"]):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx([-x for x in ref], abs=1e-4)

    report = json.loads(flops_file.read_text())
    assert {r["resolution"] for r in report["samples"]} == {"base"} and report["summary"]["active_sa_counts"] == {"none": 3 * len(docs)}
    by_doc = {s["doc_id"]: s for s in report["samples"] if s["request"] == "generate_until"}
    for i, row in enumerate(rows):  # the base-only prefill + the routing pass; the base view's crop only
        assert by_doc[i]["llm_flops"] > row["llm_flops"] and by_doc[i]["vision_flops"] == pytest.approx(row["vision_flops"])
