"""Where does the answer look? Per layer and head, the attention mass on the place a keyed question names.

For the keyed families (``presence``, ``kind_color``, ``doc``, ``chart``) the scene says where the answer is drawn
(``visor.train.lookup.lookup_boxes``: the named shape, the key's document row, the label's chart column). This runs
each test item's prompt with its reference answer (teacher forcing), and at the token that predicts the answer's
first token measures, in every decoder layer and head, the share of attention on those image tokens, with the
hooks the lookup loss trains with (``visor.train.lookup.LookupSupervision``, every head). It also reads whether
that token's greedy prediction is the answer's first token (for the one-token answers of these families, whether
the answer is right).

Per family it prints the first-token accuracy, then per layer the mean mass of the best head and of all heads beside
the *uniform* share (attention spread evenly over the visible tokens would put this much there), and the accuracy of
the items on which the best head puts more than half its attention on the place, against the others.

    python benchmarks/keyed_lookup_attention.py checkpoints-focus5/base --image-size 128 --n 200

``--region answer`` measures the mass on the answer's glyphs only (a document row's value, a bar's printed value)
instead of the whole row or column (``visor.train.lookup.lookup_boxes``).

``--questions`` asks every candidate's question about the same image: does the answer change with the question?
``--copying`` asks which heads the answer is read from: it measures every head's attention on every candidate (each
row of a document, bar of a chart, shape of a kind_color scene) and, on the items where a head looks at one of them,
how often the model's prediction is that candidate's value.

A presence item whose kind is absent names no place and is skipped. bf16 autocast; one JSON line last.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from visor.train.lookup import KEYED_FAMILIES, crop_geometry


def measure(model, batcher, family: str, n: int, config, seed: int = 0, progress: bool = True,
            region: str = "place", question_first: bool = False, split: str = "test", keep_context: bool = False,
            candidates: bool = False) -> dict:
    """Masses ``[items, layers, heads]``, first-token correctness ``[items]``, uniform shares ``[items]``, the
    answers' first tokens ``[items]`` and the greedy predictions ``[items]`` of the first ``n`` items of ``split`` of
    ``family`` that name a place; with ``keep_context`` also what each head reads there, ``[items, layers, heads,
    head_dim]``; with ``candidates`` (doc, chart, kind_color) also, per item, the masses on every candidate place
    ``[layers, candidates, heads]`` (the named one first) and the first token each would be answered with."""
    from visor.analysis.common import autocast
    from visor.data.batch import Sample
    from visor.data.synth.generate import generate_item
    from visor.train.lookup import (LookupSupervision, batch_lookup_targets, image_token_targets, lookup_boxes,
                                    lookup_candidates, on_image_tokens)

    decoder = model.language_model
    lookup = LookupSupervision(decoder, list(range(len(decoder.layers))), decoder.layers[0].self_attn.num_heads,
                               keep_context=keep_context)
    geometry = crop_geometry(model.config)
    masses, correct, uniform, answers, contexts, predictions = [], [], [], [], [], []
    candidate_masses, candidate_tokens = [], []
    index = 0
    bar = tqdm(total=n, desc=family, disable=not progress, leave=False)
    try:
        while len(correct) < n:
            item = generate_item(split, index, seed=seed, config=config, families=[family])
            index += 1
            boxes = lookup_boxes(item.scene, region)
            if not boxes:
                continue
            sample = Sample([item.image], item.conversations(question_first))  # the prompt as trained, with its answer
            batch = batcher.train_batch([sample])
            targets = image_token_targets(boxes, item.scene["size"], *geometry)
            queries, full = batch_lookup_targets(batch["input_ids"], batch["labels"], model.config.image_token_id,
                                                 [[targets]])
            position = int(queries[0, 1])  # one turn: the token that predicts the answer
            answer = int(batch["labels"][0, position + 1])
            if candidates:  # every candidate place at the same query position, the named one first
                places = lookup_candidates(item.scene, region)
                tokens = [batcher.tokenizer.encode(text, add_special_tokens=False)[0] for _, text in places]
                if not places or tokens[0] != answer:
                    raise ValueError(f"{family}: candidates need a family read from a place, whose answer's first "
                                     "token the tokenizer gives alone")
                full = torch.stack([on_image_tokens(batch["input_ids"][0], model.config.image_token_id,
                                                    image_token_targets(place, item.scene["size"], *geometry))
                                    for place, _ in places])
                queries = queries.expand(len(places), 2)
            lookup.arm(queries, full, batch["attention_mask"])
            with torch.no_grad(), autocast("bf16"):
                out = model(**batch)
            _, mass = lookup.take()
            masses.append(mass[:, 0].float())  # [layers, heads]
            if candidates:
                candidate_masses.append(mass.float())
                candidate_tokens.append(torch.tensor(tokens))
            (slot,) = (out.text_index[0] == position).nonzero()[:, 0].tolist()  # logits cover the text stream
            answers.append(answer)
            predictions.append(int(out.logits[0, slot].argmax()))
            correct.append(predictions[-1] == answer)
            if keep_context:
                contexts.append(lookup.contexts()[:, 0])
            uniform.append(float(full[0].sum()) / (position + 1))
            bar.update(1)
    finally:
        lookup.remove()
        bar.close()
    result = {"mass": torch.stack(masses), "correct": torch.tensor(correct), "uniform": torch.tensor(uniform),
              "answer": torch.tensor(answers), "prediction": torch.tensor(predictions)}
    if candidates:
        result["candidate_mass"], result["candidate_token"] = candidate_masses, candidate_tokens
    if keep_context:
        result["context"] = torch.stack(contexts)
    return result


def question_sensitivity(model, batcher, family: str, n: int, config, seed: int = 0, progress: bool = True,
                         question_first: bool = False) -> dict:
    """Does the answer depend on the question? For the first ``n`` test images of ``family`` whose candidates
    (every row, bar or shape a question could name) have distinct answers, ask every candidate's question about the
    same image and take the greedy first token of each answer. A model that looks where the question points gives
    a different answer to each; one that reads a candidate chosen by the image alone gives the same to all.
    Returns ``images``, ``same_answer`` (the share of images given one answer for every question), ``accuracy``
    (first-token, over every question), ``distinct`` (mean distinct answers per image over the candidates) and
    ``reach``: per decoder layer, how much the visual states entering it move when the question changes (the mean
    over the image tokens of ``|x_other - x_named|``, over the mean ``|x_named|``, averaged over the other questions
    and the images). With the image first it is 0 in every layer (the image tokens never see the question); with the
    question first it says how far the question reaches into the visual tokens."""
    same, right, asked, distinct, images, index = 0, 0, 0, [], 0, 0
    layers = model.language_model.layers
    entering: dict[int, torch.Tensor] = {}  # layer -> its self-attention input, of the last forward
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda attn, args, i=i: entering.__setitem__(i, args[0].detach())) for i, layer in enumerate(layers)]
    reach = torch.zeros(len(layers))
    bar = tqdm(total=n, desc=f"{family} questions", disable=not progress, leave=False)
    try:
        while images < n:
            results = _ask_every_question(model, batcher, family, config, seed, question_first, index, entering)
            index += 1
            if not results:
                continue
            predictions = [prediction for prediction, _, _ in results]
            right += sum(prediction == target for prediction, target, _ in results)
            asked += len(results)
            named = results[0][2]  # [layers, image tokens, hidden] under the named question
            scale = named.norm(dim=-1).mean(-1).clamp_min(1e-12)  # [layers]
            reach += torch.stack([(states - named).norm(dim=-1).mean(-1) / scale
                                  for _, _, states in results[1:]]).mean(0)
            same += len(set(predictions)) == 1
            distinct.append(len(set(predictions)) / len(predictions))
            images += 1
            bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    bar.close()
    return {"images": images, "same_answer": same / images, "accuracy": right / asked,
            "distinct": sum(distinct) / images, "reach": (reach / images).tolist()}


def _ask_every_question(model, batcher, family: str, config, seed: int, question_first: bool, index: int,
                        entering: dict) -> list[tuple[int, int, torch.Tensor]]:
    """Test item ``index`` of ``family``: if its candidates have distinct answers, ask each candidate's question
    (the named one first) and return per question ``(greedy first token, reference first token, [layers, image
    tokens, hidden] visual states entering each layer, read from ``entering``)``; else ``[]``."""
    import dataclasses

    from visor.analysis.common import autocast
    from visor.data.batch import Sample
    from visor.data.synth.families import derive_answer, other_queries, question_text
    from visor.data.synth.generate import generate_item

    item = generate_item("test", index, seed=seed, config=config, families=[family])
    scenes = [{**item.scene, "query": q} for q in [item.scene["query"]] + other_queries(item.scene)]
    answers = [derive_answer(scene) for scene in scenes]
    if len(set(answers)) != len(answers) or len(answers) < 2:
        return []
    results = []
    for scene, answer in zip(scenes, answers):
        asked_item = dataclasses.replace(item, scene=scene, question=question_text(scene), answer=answer)
        batch = batcher.train_batch([Sample([item.image], asked_item.conversations(question_first))])
        position = int((batch["labels"][0] != -100).nonzero()[0, 0]) - 1  # predicts the answer's first token
        with torch.no_grad(), autocast("bf16"):
            out = model(**batch)
        (slot,) = (out.text_index[0] == position).nonzero()[:, 0].tolist()
        image = batch["input_ids"][0] == model.config.image_token_id
        states = torch.stack([entering[i][0, image].float() for i in range(len(entering))])
        results.append((int(out.logits[0, slot].argmax()), int(batch["labels"][0, position + 1]), states))
    return results


def readout(train: dict, test: dict, layer: int, head: int, epochs: int = 200, lr: float = 0.05) -> dict:
    """A linear probe from what one head reads at the answer's token to the answer's first token, fitted on
    ``train`` and scored on ``test`` (``measure(..., keep_context=True)`` results): does the head carry the answer?
    Reported beside the model's own first-token accuracy, on every test item and on those where the head puts more
    than half its attention on the place."""
    classes = sorted(set(train["answer"].tolist()) | set(test["answer"].tolist()))
    index = {c: i for i, c in enumerate(classes)}

    def features(result):
        x = result["context"][:, layer, head]
        return x, torch.tensor([index[a] for a in result["answer"].tolist()])

    x_train, y_train = features(train)
    x_test, y_test = features(test)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(x_train.shape[1], len(classes))
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    torch.manual_seed(0)
    for _ in range(epochs):  # full batch: a few thousand items of head_dim features
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(probe((x_train - mean) / std), y_train).backward()
        optimiser.step()
    with torch.no_grad():
        right = probe((x_test - mean) / std).argmax(-1) == y_test
    focused = test["mass"][:, layer, head] > 0.5
    share = lambda hits, where: float(hits[where].float().mean()) if where.any() else None  # noqa: E731
    every = torch.ones_like(focused)
    return {"layer": layer, "head": head, "n_train": len(y_train), "n_test": len(y_test),
            "probe_accuracy": share(right, every), "probe_accuracy_focused": share(right, focused),
            "model_accuracy": share(test["correct"], every), "model_accuracy_focused": share(test["correct"], focused),
            "focused_share": float(focused.float().mean())}


def copying(result: dict, min_focused: float = 0.1) -> list[dict]:
    """Which heads does the answer copy from? Per layer and head, on the items where the head puts more than half its
    attention on one candidate place (``measure(..., candidates=True)``), how often the model's prediction is that
    candidate's answer (``agreement``), beside what a head looking at a candidate drawn independently of the
    prediction would reach (``chance``: the share of the item's candidates answered with the prediction) and how
    often the focused candidate is the named one. Heads focused on fewer than ``min_focused`` of the items are left
    out; sorted by agreement above chance."""
    rows = []
    n_layers, n_heads = result["mass"].shape[1:]
    for layer in range(n_layers):
        for head in range(n_heads):
            agree, chance, named = [], [], []
            for mass, tokens, prediction in zip(result["candidate_mass"], result["candidate_token"],
                                                result["prediction"].tolist()):
                best_mass, best = mass[layer, :, head].max(0)
                if best_mass > 0.5:
                    agree.append(int(tokens[best]) == prediction)
                    chance.append(float((tokens == prediction).float().mean()))
                    named.append(int(best) == 0)
            if len(agree) >= min_focused * len(result["prediction"]):
                share = lambda values: sum(values) / len(values)  # noqa: E731
                rows.append({"layer": layer, "head": head, "focused_share": len(agree) / len(result["prediction"]),
                             "agreement": share(agree), "chance": share(chance), "named": share(named)})
    return sorted(rows, key=lambda r: r["chance"] - r["agreement"])


def summarise(result: dict) -> dict:
    """Per layer: the best head (by mean mass), its mean mass, the mean over heads, and the accuracy of the items
    on which that head puts more / not more than half its attention on the place."""
    mass, correct = result["mass"], result["correct"].float()
    layers = []
    for layer in range(mass.shape[1]):
        per_head = mass[:, layer].mean(0)
        best = int(per_head.argmax())
        focused = mass[:, layer, best] > 0.5
        layers.append({"layer": layer, "best_head": best, "best_head_mass": float(per_head[best]),
                       "mean_mass": float(per_head.mean()), "focused_share": float(focused.float().mean()),
                       "accuracy_focused": float(correct[focused].mean()) if focused.any() else None,
                       "accuracy_unfocused": float(correct[~focused].mean()) if (~focused).any() else None})
    return {"n": len(correct), "accuracy": float(correct.mean()), "uniform": float(result["uniform"].mean()),
            "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a LLaVA-OV or VISOR checkpoint folder (every layer self-attention)")
    parser.add_argument("--families", nargs="+", choices=KEYED_FAMILIES, default=list(KEYED_FAMILIES))
    parser.add_argument("--n", type=int, default=100, help="items per family that name a place")
    parser.add_argument("--image-size", type=int, default=None,
                        help="synth canvas in px (default: the benchmark's; 128 for the shipped models)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the test items")
    parser.add_argument("--region", choices=("place", "answer"), default="place",
                        help="place: the named shape, document row or chart column; answer: the value's glyphs only")
    parser.add_argument("--question-first", action="store_true",
                        help="the question before the image in the prompt (a model trained with data.question_first)")
    parser.add_argument("--readout", default=None, metavar="LAYER:HEAD",
                        help="also fit a linear probe from what that head reads to the answer (on --n-train train "
                             "items) and score it on the test items: does the head carry the answer?")
    parser.add_argument("--n-train", type=int, default=1500, help="train items per family for --readout")
    parser.add_argument("--questions", action="store_true",
                        help="also ask every candidate's question about the same test images: does the answer change "
                             "with the question?")
    parser.add_argument("--copying", action="store_true",
                        help="also measure which heads the answer is copied from: per head, how often the prediction "
                             "is the value of the candidate (any row, bar or shape) it looks at (not presence)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from visor.analysis.common import load
    from visor.data.batch import Batcher
    from visor.data.synth.config import DEFAULT_CONFIG

    model, tokenizer, processor, _ = load(args.checkpoint)
    if model.plan.cross_attention_layers or len(model.plan.self_attention_layers) != model.plan.num_layers:
        raise SystemExit("the answer's attention to the image is measured on a model whose every layer is "
                         "self-attention (a LLaVA-OV baseline)")
    config = DEFAULT_CONFIG.with_image_size(args.image_size) if args.image_size else DEFAULT_CONFIG
    batcher = Batcher.for_model(model, tokenizer, processor)
    head_spec = None
    if args.readout:
        try:
            head_spec = tuple(int(v) for v in args.readout.split(":"))
            if len(head_spec) != 2:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--readout must be LAYER:HEAD, got {args.readout!r}") from None
        layers, heads = model.plan.num_layers, model.language_model.layers[0].self_attn.num_heads
        if not (0 <= head_spec[0] < layers and 0 <= head_spec[1] < heads):
            raise SystemExit(f"--readout {args.readout}: layers are 0..{layers - 1}, heads 0..{heads - 1}")
    report = {}
    for family in args.families:
        options = dict(region=args.region, question_first=args.question_first, keep_context=head_spec is not None)
        with_candidates = args.copying and family != "presence"
        result = measure(model, batcher, family, args.n, config, args.seed, candidates=with_candidates, **options)
        summary = summarise(result)
        if with_candidates:
            summary["copying"] = copying(result)
        if args.questions and family != "presence":
            summary["questions"] = question_sensitivity(model, batcher, family, args.n, config, args.seed,
                                                        question_first=args.question_first)
        if head_spec is not None:
            train = measure(model, batcher, family, args.n_train, config, args.seed, split="train", **options)
            summary["readout"] = readout(train, result, *head_spec)
        report[family] = summary
        print(f"{family}: first-token accuracy {100 * summary['accuracy']:.1f}% on {summary['n']} items; uniform "
              f"share on the named place {100 * summary['uniform']:.1f}%")
        for row in summary["layers"]:
            split = "  ".join(f"{name} {'-' if row[key] is None else f'{100 * row[key]:.0f}%'}"
                              for name, key in (("acc focused", "accuracy_focused"), ("unfocused", "accuracy_unfocused")))
            print(f"  layer {row['layer']}: best head {row['best_head']} {100 * row['best_head_mass']:5.1f}%  "
                  f"all heads {100 * row['mean_mass']:5.1f}%  focused (>50%) on {100 * row['focused_share']:3.0f}% "
                  f"of items  {split}")
        if "questions" in summary:
            q = summary["questions"]
            print(f"  every candidate's question about the same {q['images']} images: one answer for all of them on "
                  f"{100 * q['same_answer']:.1f}% of the images; distinct answers per question "
                  f"{100 * q['distinct']:.1f}%; first-token accuracy {100 * q['accuracy']:.1f}%")
            print("  the visual states entering each layer move, when the question changes, by "
                  + "  ".join(f"{i}: {100 * v:.2f}%" for i, v in enumerate(q["reach"])))
        if "copying" in summary:
            print("  heads the answer is copied from (prediction = the value of the candidate the head looks at):")
            for r in summary["copying"][:8]:
                print(f"    layer {r['layer']} head {r['head']}: focused on one candidate in {100 * r['focused_share']:3.0f}% "
                      f"of items; prediction is its value in {100 * r['agreement']:5.1f}% (chance {100 * r['chance']:4.1f}%); "
                      f"it is the named one in {100 * r['named']:4.1f}%")
        if "readout" in summary:
            r = summary["readout"]
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            print(f"  readout of layer {r['layer']} head {r['head']} ({r['n_train']} train items): a linear probe reads "
                  f"the answer from it on {pct(r['probe_accuracy'])} of the test items, {pct(r['probe_accuracy_focused'])} "
                  f"of those it looks at the place in ({pct(r['focused_share'])}); the model answers "
                  f"{pct(r['model_accuracy'])} and {pct(r['model_accuracy_focused'])}")
    print(json.dumps({"checkpoint": args.checkpoint, "image_size": config.image_size, "n": args.n,
                      "seed": args.seed, "region": args.region, "question_first": args.question_first, "families": report}))


if __name__ == "__main__":
    main()
