"""Run by tests/test_lmms.py inside the lmms-eval environment (.venv-lmms): lmms-eval's own API
(entry-point registry, TaskManager with a local task folder, ``simple_evaluate``) drives ``--model visor``.

    driver.py SPEC.json OUT.json

SPEC: ``{"model_args": str, "task_dir": str, "tasks": [...], "batch_size": int, "check_loglikelihood": {...}}``.
OUT: lmms-eval's results (per task metrics), the logged samples' predictions/responses, the FLOPs report,
and, for a multiple-choice task, log-likelihoods recomputed here with a plain forward pass.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None, "torchvision must not be in the lmms-eval test env"
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model, get_model_manifest
    from lmms_eval.tasks import TaskManager

    manifest = get_model_manifest("visor")  # registered through the 'lmms_eval.models' entry point
    cls = get_model("visor")
    task_manager = TaskManager(include_path=spec["task_dir"])
    results = simple_evaluate(model="visor", model_args=spec["model_args"], tasks=spec["tasks"],
                              batch_size=spec["batch_size"], device="cpu", log_samples=True,
                              task_manager=task_manager, bootstrap_iters=0, process_docs_parallel=1)
    out = {
        "manifest": {"model_id": manifest.model_id, "simple_class_path": manifest.simple_class_path},
        "class": f"{cls.__module__}.{cls.__name__}",
        "results": results["results"],
        "samples": {task: [{"doc_id": s["doc_id"], "doc": s["doc"], "resps": s["resps"],
                            "filtered_resps": s["filtered_resps"], "target": s.get("target")} for s in samples]
                    for task, samples in results["samples"].items()},
    }
    check = spec.get("check_loglikelihood")
    if check:
        out["recomputed"] = recompute_loglikelihoods(check)
    print(json.dumps(out, default=str))
    json.dump(out, open(sys.argv[2], "w"), default=str)
    return 0


def recompute_loglikelihoods(check: dict) -> list[list[float]]:
    """Sum of log-probabilities of each choice after the generation prompt, from the full logits of
    one unbatched forward pass per (doc, choice): the reference the plugin's batched path must match."""
    import torch
    from PIL import Image

    from visor.cli.eval import load_for_eval
    from visor.data.batch import Batcher, Sample
    from visor.processing.processor import VisorProcessor

    model, _ = load_for_eval(check["pretrained"], torch.float32)
    processor = VisorProcessor.from_pretrained(check["pretrained"])
    batcher = Batcher.for_model(model, processor.tokenizer, processor.image_processor)
    active = model.plan.resolve_active(check["active_sa"])
    out = []
    for doc in check["docs"]:
        image = Image.open(doc["image"]).convert("RGB")
        sample = Sample([image], [{"from": "human", "value": "<image>\n" + doc["question"]}])
        resolution = check.get("resolution")  # "base": the layout a resolution router picks without tiles
        prompt = batcher.prompt_ids(sample, resolution)
        row = []
        for choice in doc["choices"]:
            cont = processor.tokenizer.encode(check["delimiter"] + choice, add_special_tokens=False)
            ids = torch.tensor([prompt + cont])
            pixels = batcher._pixels([sample], resolution)
            with torch.no_grad():
                output = model(ids, attention_mask=torch.ones_like(ids), active_sa=active, **pixels)
            logprobs = torch.log_softmax(output.logits[0].float(), -1)  # text-stream slots
            slot_of = {int(p): k for k, p in enumerate(output.text_index[0].tolist()) if p >= 0}
            row.append(float(sum(logprobs[slot_of[len(prompt) - 1 + k], cont[k]] for k in range(len(cont)))))
        out.append(row)
    return out


if __name__ == "__main__":
    sys.exit(main())
