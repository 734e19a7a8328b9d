"""Supervised lookup (visor.train.lookup): the places the scenes name, their image tokens in LLaVA-OV's order, the
answer query positions, the attention mass the hooks measure, and a base run that learns to attend there."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train import TINY_MODEL, tiny_recipe
from visor.data.synth.config import DEFAULT_CONFIG
from visor.data.synth.families import derive_answer, other_queries
from visor.data.synth.generate import generate_item
from visor.train.lookup import (answer_query_positions, batch_lookup_targets, image_token_targets, lookup_boxes,
                                lookup_candidates)
from visor.train.recipe import load_recipe

PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128], [192, 192]]


def _inside(point, box) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def test_lookup_boxes_hold_the_answer_and_only_it():
    """Every question of a keyed scene gets one box that holds what answers it (the shape of the named kind, the
    document row of the key, the chart column of the label) and no other candidate; the rest get none."""
    config = DEFAULT_CONFIG.with_image_size(128)
    for family in ("presence", "kind_color", "doc", "chart"):
        for index in range(12):
            item = generate_item("train", index, seed=5, config=config, families=[family])
            for query in [item.scene["query"]] + other_queries(item.scene):
                scene = {**item.scene, "query": query}
                boxes, answer = lookup_boxes(scene), derive_answer(scene)
                if family == "presence" and answer == "no":
                    assert boxes == []
                    continue
                if family in ("presence", "kind_color"):  # a presence image may hold a kind twice
                    named = [s for s in scene["shapes"] if s["kind"] == query["kind"]]
                    assert len(boxes) == len(named) >= 1
                    for box in boxes:
                        inside = [s for s in scene["shapes"] if _inside((s["cx"], s["cy"]), box)]
                        assert len(inside) == 1 and inside[0] in named
                        if family == "kind_color":
                            assert inside[0]["color"] == answer
                    continue
                (box,) = boxes
                if family == "doc":
                    rows = [t["text"] for t in scene["texts"] if _inside((t["x"], t["y"] + 1), box)]
                    assert rows == [f"{query['key']}: {answer}"]
                else:
                    texts = [t["text"] for t in scene["texts"] if _inside((t["x"] + 1, t["y"] + 1), box)]
                    assert sorted(texts) == sorted([answer, query["label"]])
        if family in ("doc", "chart"):  # the answer region: the value's glyphs only, inside the place
            for query in [item.scene["query"]] + other_queries(item.scene):
                scene = {**item.scene, "query": query}
                (place,), (answer_box,) = lookup_boxes(scene), lookup_boxes(scene, "answer")
                assert place[0] <= answer_box[0] < answer_box[2] <= place[2] and place[1] <= answer_box[1]
                held = [t["text"] for t in scene["texts"] if _inside((t["x"] + 1, t["y"] + 1), answer_box)]
                assert held == ([derive_answer(scene)] if family == "chart" else [])  # a doc value starts mid-row
                assert answer_box[2] - answer_box[0] < 4 * len(derive_answer(scene)) + 4
    with pytest.raises(ValueError, match="region"):
        lookup_boxes(item.scene, "row")
    for family in ("color", "code", "dots"):
        assert lookup_boxes(generate_item("train", 0, seed=5, config=config, families=[family]).scene) == []


def test_lookup_candidates_name_every_place_the_question_could():
    """The candidates of a keyed scene are every row, bar or shape a question could name, the named one first, each
    with the boxes and answer a question naming it gets; presence (answered yes or no) and one-answer families have
    none."""
    config = DEFAULT_CONFIG.with_image_size(128)
    for family, count in (("doc", lambda s: sum(t["role"] == "doc_row" for t in s["texts"])),
                          ("chart", lambda s: len(s["bars"])), ("kind_color", lambda s: len(s["shapes"]))):
        for index in range(6):
            item = generate_item("test", index, seed=3, config=config, families=[family])
            candidates = lookup_candidates(item.scene, "answer")
            assert len(candidates) == count(item.scene) >= 2
            assert candidates[0] == (lookup_boxes(item.scene, "answer"), item.answer)
            assert len({tuple(boxes[0]) for boxes, _ in candidates}) == len(candidates)  # one place each
    for family in ("presence", "color", "code"):
        assert lookup_candidates(generate_item("test", 0, seed=3, config=config, families=[family]).scene) == []


def test_image_token_targets_follow_the_llava_ov_layout():
    """128 px on a 64 px base view with 8 px patches: 8 x 8 base tokens, then 16 rows of 16 tile patches and a
    newline. A box over one 8 px patch marks that patch of the tile grid and the 16 px cell of the base view."""
    from visor.model.vision import image_token_count

    targets = image_token_targets([(8, 16, 16, 24)], (128, 128), 64, 8, PINPOINTS)
    assert targets.numel() == image_token_count((128, 128), grid_pinpoints=PINPOINTS, base_size=64, patch_size=8,
                                                vision_aspect_ratio="anyres_max_9", tiled=True, drop_first_token=False)
    assert targets.nonzero()[:, 0].tolist() == [1 * 8 + 0, 64 + 2 * 17 + 1]
    wide = image_token_targets([(0, 0, 128, 64)], (128, 64), 64, 8, PINPOINTS)  # 2 tiles side by side, 8 rows
    assert wide.numel() == 64 + 8 * 17 and int(wide[64:].sum()) == 8 * 16 and int(wide[:64].sum()) == 64
    with pytest.raises(ValueError, match="grid resolution"):
        image_token_targets([(0, 0, 8, 8)], (100, 100), 64, 8, PINPOINTS)


def test_answer_query_positions_and_batch_targets():
    labels = torch.tensor([-100, -100, 7, 8, -100, -100, 9, -100])
    assert answer_query_positions(labels) == [1, 5]
    ids = torch.tensor([[1, 5, 5, 5, 2, 7, 8, 3, 4, 9, 0], [1, 5, 5, 5, 2, 7, 8, 3, 4, 9, 0]])
    lab = torch.full_like(ids, -100)
    lab[:, [5, 6, 9]] = ids[:, [5, 6, 9]]
    first = torch.tensor([False, True, False])
    queries, targets = batch_lookup_targets(ids, lab, 5, [[first, None], [None, torch.tensor([True, False, True])]])
    assert queries.tolist() == [[0, 4], [1, 8]]
    assert targets[0].nonzero()[:, 0].tolist() == [2] and targets[1].nonzero()[:, 0].tolist() == [1, 3]
    with pytest.raises(ValueError, match="answer turns"):
        batch_lookup_targets(ids, lab, 5, [[first], [None, None]])
    with pytest.raises(ValueError, match="image tokens"):
        batch_lookup_targets(ids, lab, 5, [[torch.tensor([True, False]), None], [None, None]])


def _lookup_trainer(tmp_path, name: str, data: dict | None = None, **overrides):
    from visor.train.loop import Trainer

    data = {"families": ["doc", "kind_color", "presence"], "questions_per_image": 2, "synth_image_size": 128,
            **(data or {})}
    overrides = {"lookup_weight": 1.0, **overrides}
    recipe = load_recipe(tiny_recipe(tmp_path, name, model={**TINY_MODEL, "patch_size": 8}, data=data, **overrides))
    trainer = Trainer(recipe, progress=False)
    trainer.build()
    return trainer


def test_lookup_mass_is_the_layers_own_attention(tmp_path):
    """With every head supervised, the mass the hooks measure is the layer's real attention from the answer query
    position to the target tokens (``visor.analysis.attention``'s recomputation, mean over heads), for each row of a
    right-padded batch as for the sample alone; the loss is -log of it, and the hooks do nothing once disarmed."""
    from visor.analysis.attention import image_attention_share
    from visor.analysis.common import walk_layers
    from visor.train.lookup import LookupSupervision

    trainer = _lookup_trainer(tmp_path, "mass", lookup_layers=[1, 3], lookup_heads=4)
    task, model = trainer.task, trainer.model
    torch.manual_seed(0)
    for p in model.language_model.parameters():  # sharper attention than the fresh init's
        p.data.add_(0.3 * torch.randn_like(p))
    indices = [0, 1, 2]
    batch = task.batch(indices)
    queries, targets = batch["lookup_targets"]
    assert queries.shape[0] >= 3 and batch["attention_mask"].sum(-1).unique().numel() > 1  # padded rows
    task.lookup.keep_context = True
    seen = {}  # what o_proj reads in layer 1: every head's attention output, as the model's own SDPA computed it
    handle = model.language_model.layers[1].self_attn.o_proj.register_forward_hook(
        lambda module, args, output: seen.update(o_in=args[0].detach()))  # returns None: the output stays
    task.lookup.arm(queries, targets, batch["attention_mask"])
    model(**{k: v for k, v in batch.items() if k != "lookup_targets"})
    handle.remove()
    loss, masses = task.lookup.take()
    contexts = task.lookup.contexts()  # [layers, K, heads, head_dim]
    o_in = seen["o_in"][queries[:, 0], queries[:, 1]].view(queries.shape[0], 4, -1)
    assert torch.allclose(contexts[0], o_in, atol=1e-5)
    assert masses.shape == (2, queries.shape[0], 4) and float(loss.detach()) == pytest.approx(
        float(-torch.log(masses).mean()), rel=1e-5)
    for k, (row, position) in enumerate(queries.tolist()):
        alone = task.batch([indices[row]])
        valid = int(batch["attention_mask"][row].sum())
        assert torch.equal(alone["input_ids"][0], batch["input_ids"][row, :valid])

        def before(index, kind, streams, k=k, position=position):
            if index in (1, 3):
                share, _ = image_attention_share(model.language_model.layers[index], model.language_model.rotary_emb,
                                                 streams, torch.tensor([position]), targets[k, :valid])
                assert float(share) == pytest.approx(float(masses[(1, 3).index(index), k].mean()), abs=1e-5)

        with torch.no_grad():
            walk_layers(model, {k: v for k, v in alone.items() if k != "lookup_targets"}, None, before=before)
    chosen = LookupSupervision(model.language_model, [3, 1], [3, 0], keep_context=True)  # heads by index
    chosen.arm(queries, targets, batch["attention_mask"])
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "lookup_targets"})
    _, picked = chosen.take()
    chosen.remove()
    assert torch.allclose(picked, masses[[1, 0]][:, :, [3, 0]], atol=1e-6)
    assert torch.allclose(chosen.contexts()[1], contexts[0][:, [3, 0]], atol=1e-6)
    with pytest.raises(RuntimeError, match="not armed"):
        task.lookup.take()
    model(**{k: v for k, v in batch.items() if k != "lookup_targets"})  # disarmed: nothing kept
    assert task.lookup._masses == {}


def test_base_run_learns_to_attend_where_the_question_points(tmp_path):
    """A tiny base run with a lookup weight: the supervised head's mass on the named place rises, the loss adds the
    weighted term per target token, and the exported model is a plain LLaVA-OV checkpoint."""
    from safetensors.torch import load_file

    from visor.train.loop import Trainer

    trainer = _lookup_trainer(tmp_path, "learn", lookup_layers=[2], max_steps=30, save_every=30, log_every=5,
                              optim={"lr": 1e-2, "warmup_steps": 2})
    batch = trainer.task.batch([0, 1])
    loss = torch.no_grad()(trainer.task.loss)
    total, tokens = loss(trainer.model, batch, 0)
    answer, _ = loss(trainer.model, {k: v for k, v in batch.items() if k != "lookup_targets"}, 0)
    trainer.task.lookup.arm(*batch["lookup_targets"], batch["attention_mask"])
    with torch.no_grad():
        trainer.model(**{k: v for k, v in batch.items() if k != "lookup_targets"})
    lookup_loss, _ = trainer.task.lookup.take()
    assert float(total - answer) == pytest.approx(float(lookup_loss) * tokens, rel=1e-4)

    final = Trainer(trainer.recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    masses = [r["lookup_mass"] for r in rows if "lookup_mass" in r]
    assert len(masses) == 6 and masses[-1] > 2 * masses[0], masses
    assert not any("aux" in k for k in load_file(str(final / "model.safetensors")))
    assert (tmp_path / "learn" / "loss.png").stat().st_size > 0  # with the mass on a second axis


def test_question_first_recipe(tmp_path):
    """``data.question_first`` orders the training samples' first turn question-then-image (later turns have no
    image), the lookup targets still find the image tokens, and LLaVA-format data refuses it."""
    trainer = _lookup_trainer(tmp_path, "qfirst", data={"question_first": True})
    sample = trainer.task.source.sample(0)
    assert sample.turns[0]["value"].endswith("\n<image>") and "<image>" not in sample.turns[2]["value"]
    batch = trainer.task.batch([0, 1])
    queries, targets = batch["lookup_targets"]
    image = batch["input_ids"] == trainer.model.config.image_token_id
    question_tokens = (~image[0, :int(image[0].nonzero()[0])]).sum()
    assert question_tokens > 20 and queries.shape[0] >= 2 and (image[queries[:, 0]] | ~targets).all()
    with pytest.raises(ValueError, match="question_first"):
        load_recipe(tiny_recipe(tmp_path, "qllava", data={"source": "llava", "path": "x.json", "question_first": True}))


def test_lookup_recipe_checks(tmp_path):
    with pytest.raises(ValueError, match="lookup_weight"):
        load_recipe(tiny_recipe(tmp_path, "neg", lookup_weight=-1.0))
    with pytest.raises(ValueError, match="base recipe on synth"):
        load_recipe(tiny_recipe(tmp_path, "s1", kind="visor-stage1", init="x", lookup_weight=1.0))
    with pytest.raises(ValueError, match="reducers"):
        load_recipe(tiny_recipe(tmp_path, "red", lookup_weight=1.0, freeze_vision=True, reducers=["pooling:2x"]))
    with pytest.raises(ValueError, match="lookup layers"):
        _lookup_trainer(tmp_path, "layer", lookup_layers=[6])
    with pytest.raises(ValueError, match="lookup heads"):
        _lookup_trainer(tmp_path, "heads", lookup_heads=5)
    for heads in ([1, 1], [4], []):
        with pytest.raises(ValueError, match="distinct head indices"):
            _lookup_trainer(tmp_path, "ids", lookup_heads=heads)
    assert _lookup_trainer(tmp_path, "ids", lookup_heads=[3, 1]).task.lookup.heads.tolist() == [3, 1]


def test_keyed_lookup_attention_benchmark(tmp_path):
    """``benchmarks/keyed_lookup_attention.py`` on a tiny saved LLaVA-OV: masses in [0, 1] per layer and head for
    items that name a place, the first-token check read through the text stream, and no hook left behind."""
    from tests.tiny import load_benchmark, tiny_benchmark_llava, tiny_image_processor
    from visor.analysis.common import load
    from visor.data.batch import Batcher
    from visor.data.synth.config import DEFAULT_CONFIG

    script = load_benchmark("keyed_lookup_attention")
    model, tok, config = tiny_benchmark_llava(3, seed=0, image_size=64)
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    tiny_image_processor(config).save_pretrained(str(tmp_path))
    visor, tokenizer, processor, _ = load(tmp_path)
    batcher = Batcher.for_model(visor, tokenizer, processor)
    config128 = DEFAULT_CONFIG.with_image_size(128)
    result = script.measure(visor, batcher, "presence", 4, config128, seed=2, progress=False)
    assert result["mass"].shape == (4, 3, 4) and ((result["mass"] >= 0) & (result["mass"] <= 1 + 1e-5)).all()
    assert (result["uniform"] > 0).all() and (result["uniform"] < 1).all() and result["correct"].dtype == torch.bool
    summary = script.summarise(result)
    assert summary["n"] == 4 and len(summary["layers"]) == 3
    for row in summary["layers"]:
        assert row["best_head_mass"] >= row["mean_mass"]
    place = script.measure(visor, batcher, "doc", 3, config128, seed=2, progress=False)
    answer = script.measure(visor, batcher, "doc", 3, config128, seed=2, progress=False, region="answer")
    assert (answer["uniform"] < place["uniform"]).all() and (answer["mass"] <= place["mass"] + 1e-5).all()
    candidates = script.measure(visor, batcher, "doc", 3, config128, seed=2, progress=False, region="answer",
                                candidates=True)
    assert torch.equal(candidates["mass"], answer["mass"]) and torch.equal(candidates["correct"], answer["correct"])
    for mass, tokens, named, first in zip(candidates["candidate_mass"], candidates["candidate_token"],
                                          answer["mass"], answer["answer"].tolist()):
        assert mass.shape == (3, len(tokens), 4) and torch.allclose(mass[:, 0], named) and int(tokens[0]) == first
        assert float(mass.sum(1).max()) <= 1 + 1e-5  # candidates are disjoint places
    assert (candidates["correct"] == (candidates["prediction"] == candidates["answer"])).all()
    with pytest.raises(ValueError, match="candidates"):
        script.measure(visor, batcher, "presence", 1, config128, seed=2, progress=False, candidates=True)
    sensitivity = script.question_sensitivity(visor, batcher, "chart", 3, config128, seed=2, progress=False)
    assert sensitivity["images"] == 3 and 0 <= sensitivity["same_answer"] <= 1 and 0 <= sensitivity["accuracy"] <= 1
    assert 0.25 <= sensitivity["distinct"] <= 1  # 2-4 bars: one answer for all gives a quarter at least
    assert sensitivity["reach"] == [0.0] * len(visor.language_model.layers)  # image first: the question never reaches
    first = script.question_sensitivity(visor, batcher, "chart", 3, config128, seed=2, progress=False,
                                        question_first=True)
    assert first["reach"][0] == 0.0 and all(v > 1e-4 for v in first["reach"][1:])  # layer 0 reads the embeddings
    assert all(not layer.self_attn._forward_pre_hooks for layer in visor.language_model.layers)


def test_copying_finds_the_head_the_answer_is_read_from():
    """``copying`` ranks first the head whose focused candidate's answer is the prediction, with its agreement above
    chance, and leaves out a head that looks at no candidate."""
    from tests.tiny import load_benchmark

    script = load_benchmark("keyed_lookup_attention")
    gen = torch.Generator().manual_seed(0)
    masses, tokens, predictions = [], [], []
    for _ in range(200):
        n = int(torch.randint(2, 5, (1,), generator=gen))
        token = torch.randperm(10, generator=gen)[:n] + 100
        mass = torch.zeros(2, n, 3)  # layers, candidates, heads
        mass[:, :, :2] = torch.nn.functional.one_hot(torch.randint(0, n, (2, 2), generator=gen), n).float().transpose(1, 2) * 0.9
        copied = int(mass[1, :, 1].argmax())  # layer 1 head 1 is read from; head 2 looks at none of them
        masses.append(mass), tokens.append(token), predictions.append(int(token[copied]))
    result = {"mass": torch.stack([m[:, 0] for m in masses]), "candidate_mass": masses, "candidate_token": tokens,
              "prediction": torch.tensor(predictions)}
    rows = script.copying(result)
    assert (rows[0]["layer"], rows[0]["head"]) == (1, 1) and rows[0]["agreement"] == 1.0
    assert rows[0]["focused_share"] == 1.0 and 0.25 < rows[0]["chance"] < 0.5
    assert all(r["agreement"] < 0.6 for r in rows[1:]) and len(rows) == 4  # heads 2 never focused: left out


def test_readout_finds_an_answer_a_head_carries():
    """``readout`` fits a linear probe from one head's context to the answer token: near perfect when that head's
    context holds the answer, near chance when only another head's does; split by where the head looks."""
    from tests.tiny import load_benchmark

    script = load_benchmark("keyed_lookup_attention")
    gen = torch.Generator().manual_seed(0)

    def fake(n: int) -> dict:
        answers = torch.randint(0, 5, (n,), generator=gen)
        context = torch.randn(n, 2, 3, 8, generator=gen)  # items, layers, heads, head_dim
        context[torch.arange(n), 1, 2, answers] += 3.0  # layer 1, head 2 carries the answer
        mass = torch.rand(n, 2, 3, generator=gen)
        return {"context": context, "answer": answers + 100, "mass": mass, "correct": mass[:, 1, 2] > 0.5}

    train, test = fake(400), fake(200)
    carried = script.readout(train, test, 1, 2)
    assert carried["probe_accuracy"] > 0.9 and carried["n_test"] == 200
    assert carried["model_accuracy_focused"] == 1.0 and 0.3 < carried["focused_share"] < 0.7
    assert script.readout(train, test, 0, 2)["probe_accuracy"] < 0.4  # five answers: chance is 0.2


def test_mark_loss_is_a_balanced_bce_on_the_image_tokens():
    """``mark_loss``: the mean BCE over the place's tokens and over the other image tokens, averaged; text tokens
    and unmarked rows do not count; targets off the image are refused; no marked row gives a zero that keeps the
    head in the graph."""
    from torch import nn

    from visor.train.marking import ATTRIBUTE, TokenHead, mark_loss

    model = nn.Module()
    head = TokenHead(4, 1)
    setattr(model, ATTRIBUTE, head)
    logits = torch.tensor([[0.0, 2.0, -1.0, 3.0, -2.0, 9.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])[..., None]
    image = torch.tensor([[False, True, True, True, True, False], [False, True, True, True, True, False]])
    targets = torch.tensor([[False, True, False, False, False, False]])
    head._logits = logits
    loss, balanced, choice = mark_loss(model, torch.tensor([0]), targets, image)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    inside = bce(torch.tensor([2.0]), torch.tensor([1.0]))
    outside = bce(torch.tensor([-1.0, 3.0, -2.0]), torch.zeros(3))
    assert float(loss) == pytest.approx(float(0.5 * (inside + outside)), rel=1e-6)
    assert balanced == pytest.approx(0.5 * (1.0 + 2 / 3)) and choice != choice  # NaN: no candidates given
    head._logits = logits
    with pytest.raises(ValueError, match="image tokens"):
        mark_loss(model, torch.tensor([0]), torch.tensor([[True, False, False, False, False, False]]), image)
    head._logits = logits.requires_grad_()
    empty, _, _ = mark_loss(model, torch.zeros(0, dtype=torch.long), torch.zeros(0, 6, dtype=torch.bool), image)
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    with pytest.raises(RuntimeError, match="no forward"):
        mark_loss(model, torch.tensor([0]), targets, image)
    head.eval()
    head.capture(None, (torch.randn(1, 6, 4),))  # evaluation: nothing kept
    assert head._logits is None


def test_mark_choice_asks_whether_the_named_place_outscores_the_others():
    """``mark_choice``: per row, the named place (candidate 0) against the others by mean logit; rows without
    candidates are left out. A marker that marks every candidate alike scores well on the balanced accuracy and
    fails here."""
    from visor.train.marking import mark_choice

    logits = torch.tensor([[0.0, 4.0, 4.0, -3.0, -3.0], [0.0, 1.0, 3.0, 2.0, 0.0], [0.0, 5.0, 5.0, 5.0, 5.0]])
    place = lambda *cols: torch.tensor([c in cols for c in range(5)])  # noqa: E731
    named_first = torch.stack([place(1, 2), place(3, 4)])  # row 0: the named place outscores
    named_loses = torch.stack([place(1), place(2), place(3)])  # row 1: another candidate outscores
    assert mark_choice(logits, [named_first, named_loses, None]) == 0.5
    assert mark_choice(logits, [None, None, None]) != mark_choice(logits, [None, None, None])  # NaN
    blind = torch.stack([place(1), place(2)])  # row 2 marks every candidate alike: a tie is not a choice
    assert mark_choice(logits[2:], [blind]) == 0.0


def test_choice_loss_is_a_cross_entropy_among_the_places(tmp_path):
    """``choice_loss``: per row, softmax over the candidates' mean logits, the named one (first) as the class; rows
    without candidates are left out; ``mark_loss(choice_weight=w)`` adds w times it, and its gradient raises the
    named place against the others. A recipe with the weight and no marking is refused."""
    from torch import nn

    from visor.train.marking import ATTRIBUTE, TokenHead, choice_loss, mark_loss

    place = lambda *cols: torch.tensor([c in cols for c in range(5)])  # noqa: E731
    logits = torch.tensor([[0.0, 4.0, 2.0, -3.0, 1.0], [0.0, 1.0, 3.0, 2.0, 0.0]], requires_grad=True)
    candidates = [torch.stack([place(1, 2), place(3, 4)]), None]
    expected = -torch.log_softmax(torch.tensor([3.0, -1.0]), 0)[0]
    loss = choice_loss(logits, candidates)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert (logits.grad[0, [1, 2]] < 0).all() and (logits.grad[0, [3, 4]] > 0).all() and (logits.grad[1] == 0).all()
    with pytest.raises(ValueError, match="a row with candidates"):
        choice_loss(logits, [None, None])

    model = nn.Module()
    head = TokenHead(4, 1)
    setattr(model, ATTRIBUTE, head)
    image = torch.tensor([[False, True, True, True, True]])
    targets = place(1, 2)[None]
    head._logits = logits.detach()[:1, :, None]
    plain, _, _ = mark_loss(model, torch.tensor([0]), targets, image, candidates[:1])
    head._logits = logits.detach()[:1, :, None]
    weighted, _, _ = mark_loss(model, torch.tensor([0]), targets, image, candidates[:1], choice_weight=0.5)
    assert float(weighted - plain) == pytest.approx(0.5 * float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="mark_choice_weight"):
        load_recipe(tiny_recipe(tmp_path, "mcw", mark_choice_weight=1.0))


def test_base_run_learns_to_mark_the_named_place(tmp_path):
    """A tiny question-first base run with a mark weight: the head reads the first turn's place only (a later turn's
    question comes after the image), its loss falls, it is logged and plotted, and the export drops it."""
    from safetensors.torch import load_file

    from visor.train.loop import Trainer
    from visor.train.marking import ATTRIBUTE

    trainer = _lookup_trainer(tmp_path, "mark", data={"question_first": True}, lookup_weight=0.0, mark_weight=1.0,
                              mark_layer=2, max_steps=30, save_every=30, log_every=5,
                              optim={"lr": 1e-2, "warmup_steps": 2})
    task = trainer.task
    indices = [0, 1, 2, 3]
    batch = task.batch(indices)
    rows, targets, candidates = batch["mark_targets"]
    assert len(candidates) == rows.numel()
    for target, places in zip(targets, candidates):  # the named place first among the question's candidates
        assert places is None or (places.shape[0] >= 2 and torch.equal(places[0], target))
    assert "lookup_targets" not in batch and rows.numel() >= 2 and rows.unique().numel() == rows.numel()
    per_row = task._turn_targets(indices, [task.source.item(i) for i in indices])
    image = batch["input_ids"] == trainer.model.config.image_token_id
    for row, target in zip(rows.tolist(), targets):
        assert torch.equal(target[image[row]], per_row[row][0])  # the first turn's place, on the row's image tokens
    assert all(turns[0] is None for row, turns in enumerate(per_row) if row not in rows.tolist())
    total, tokens = task.loss(trainer.model, batch, 0)
    answer, _ = task.loss(trainer.model, {k: v for k, v in batch.items() if k != "mark_targets"}, 0)
    getattr(trainer.model, ATTRIBUTE).take()  # the second forward's capture, unused without targets
    assert float((total - answer).detach()) == pytest.approx(task.mark_loss[0] * tokens, rel=1e-3)

    final = Trainer(trainer.recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "mark" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["mark_loss"] for r in rows if "mark_loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert all(0 <= r["mark_accuracy"] <= 1 for r in rows if "mark_accuracy" in r)
    assert any("mark_choice" in r for r in rows) and all(0 <= r["mark_choice"] <= 1 for r in rows if "mark_choice" in r)
    assert not any("aux" in k for k in load_file(str(final / "model.safetensors")))
    assert (tmp_path / "mark" / "loss.png").stat().st_size > 0


def test_token_heads_benchmark_reads_the_heads_per_family(tmp_path):
    """``benchmarks/token_heads.py`` loads a run's last resume checkpoint with its heads and scores them per family
    on training indices the run never reached: every marked kind_color, doc or chart item gets a choice among its
    places, presence none; chances are 1 / places; a run without heads, or a start inside the run, is refused."""
    from tests.tiny import load_benchmark

    script = load_benchmark("token_heads")
    trainer = _lookup_trainer(tmp_path, "heads", data={"question_first": True}, lookup_weight=0.0, mark_weight=1.0,
                              mark_layer=3, tag_weight=1.0, tag_layer=1, max_steps=4, save_every=2, log_every=2)
    from visor.train.loop import Trainer

    Trainer(trainer.recipe, progress=False).train()
    run = tmp_path / "heads"
    result = script.read_heads(run, n=12, start=1000, batch_size=4, progress=False)
    assert result["checkpoint"].endswith("step_00000004")
    families = result["families"]
    expected = {}
    for index in range(1000, 1012):
        family = trainer.task.source.item(index).scene["family"]
        expected[family] = expected.get(family, 0) + 1
    assert set(families) == set(expected)
    for family, entry in families.items():
        assert 0 <= entry["tag_token_accuracy"] <= 1
        if family == "presence":  # marked only where the kind is there, and never a choice: one answer, no places
            assert "mark_choice" not in entry
        else:
            assert 0 <= entry["mark_balanced"] <= 1
            assert entry["mark_choice_n"] == expected[family] and 0 <= entry["mark_choice"] <= 1
            assert 1 / 4 <= entry["mark_chance"] <= 1 / 2 and 1 / 4 <= entry["tag_chance"] <= 1 / 2
    assert "kind_color" in script.format_report(result)
    with pytest.raises(ValueError, match="never reached"):
        script.read_heads(run, n=4, start=0, progress=False)
    recipe = json.loads((run / "final" / "recipe.json").read_text())
    (tmp_path / "plain" / "final").mkdir(parents=True)
    (tmp_path / "plain" / "final" / "recipe.json").write_text(json.dumps({**recipe, "mark_weight": 0.0,
                                                                          "tag_weight": 0.0}))
    with pytest.raises(ValueError, match="neither a mark head nor a tag head"):
        script.read_heads(tmp_path / "plain", n=4, progress=False)


def test_tag_and_mark_heads_read_their_own_layers(tmp_path):
    """``tag_layer`` puts the tag head below the mark head (left out, it reads ``mark_layer``); one batch carries
    both targets and one forward feeds both heads."""
    from visor.train.marking import ATTRIBUTE, TAG_ATTRIBUTE

    trainer = _lookup_trainer(tmp_path, "both", data={"question_first": True}, lookup_weight=0.0, mark_weight=1.0,
                              mark_layer=3, tag_weight=1.0, tag_layer=1)
    model = trainer.model
    assert getattr(model, ATTRIBUTE).layer == 3 and getattr(model, TAG_ATTRIBUTE).layer == 1
    batch = trainer.task.batch([0, 1, 2, 3])
    assert "mark_targets" in batch and "tag_labels" in batch
    trainer.task.loss(model, batch, 0)
    assert len(trainer.task.mark_loss) == 1 and len(trainer.task.tag_loss) == 1
    assert trainer.recipe.tag_read_layer == 1
    default = _lookup_trainer(tmp_path, "same", lookup_weight=0.0, tag_weight=1.0, mark_layer=2)
    assert default.recipe.tag_read_layer == 2 and getattr(default.model, TAG_ATTRIBUTE).layer == 2


def test_mark_recipe_checks(tmp_path):
    with pytest.raises(ValueError, match="question_first"):
        load_recipe(tiny_recipe(tmp_path, "mq", mark_weight=1.0))
    for weights in ({"mark_weight": -1.0}, {"tag_weight": -0.5}):
        with pytest.raises(ValueError, match="tag_weight must be >= 0"):
            load_recipe(tiny_recipe(tmp_path, "mneg", **weights))
    with pytest.raises(ValueError, match="base recipe on synth"):
        load_recipe(tiny_recipe(tmp_path, "tllava", tag_weight=1.0, data={"source": "llava", "path": "x.json"}))
    with pytest.raises(ValueError, match="base recipe on synth"):
        load_recipe(tiny_recipe(tmp_path, "ms1", kind="visor-stage1", init="x", mark_weight=1.0,
                                data={"question_first": True}))
    with pytest.raises(ValueError, match="mark_layer"):
        _lookup_trainer(tmp_path, "ml", data={"question_first": True}, lookup_weight=0.0, mark_weight=1.0, mark_layer=0)


def test_tags_name_every_place_by_its_question_word():
    """``image_token_tags``: each document row's tokens carry its key, each chart column's its label, each shape's its
    kind; a patch two places share is left out (-100), the rest is 0; a family without places is all 0."""
    from visor.train.marking import TAGS, image_token_tags, place_tags
    from visor.train.lookup import image_token_targets

    config = DEFAULT_CONFIG.with_image_size(128)
    geometry = (64, 8, [[64 * i, 64 * j] for i in range(1, 4) for j in range(1, 4)])
    for family in ("doc", "chart", "kind_color", "presence"):
        for index in range(4):
            scene = generate_item("train", index, seed=4, config=config, families=[family]).scene
            tags = place_tags(scene)
            names = {TAGS[t - 1] for _, t in tags}
            if family == "doc":
                assert names == {t["text"].partition(": ")[0] for t in scene["texts"] if t["role"] == "doc_row"}
            elif family == "chart":
                assert names == {b["label"] for b in scene["bars"]}
            else:
                assert names == {s["kind"] for s in scene["shapes"]}
            labels = image_token_tags(scene, geometry)
            assert labels.numel() == 64 + 16 * 17
            for boxes, tag in tags:
                inside = labels[image_token_targets(boxes, scene["size"], *geometry)]
                assert ((inside == tag) | (inside == -100)).all() and (inside == tag).any()
            assert set(labels.unique().tolist()) <= {-100, 0} | {t for _, t in tags}
    plain = generate_item("train", 0, seed=4, config=config, families=["code"]).scene
    assert place_tags(plain) == [] and (image_token_tags(plain, geometry) == 0).all()


def test_tag_loss_and_a_run_that_learns_the_tags(tmp_path):
    """``tag_loss`` is the mean CE over tagged tokens and over untagged ones, averaged (ignored positions out); a tiny
    image-first run with a tag weight lowers it, logs it, and exports no head."""
    from safetensors.torch import load_file
    from torch import nn

    from visor.train.loop import Trainer
    from visor.train.marking import TAG_ATTRIBUTE, TokenHead, tag_loss

    model = nn.Module()
    head = TokenHead(4, 1, outputs=3)
    setattr(model, TAG_ATTRIBUTE, head)
    logits = torch.randn(1, 5, 3)
    labels = torch.tensor([[-100, 2, 0, 0, 1]])
    head._logits = logits
    loss, accuracy = tag_loss(model, labels)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(logits[0, [1, 4]], torch.tensor([2, 1])) + ce(logits[0, [2, 3]], torch.tensor([0, 0])))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert accuracy == float((logits[0, [1, 4]].argmax(-1) == torch.tensor([2, 1])).float().mean())
    head._logits = logits
    with pytest.raises(ValueError, match="do not match"):
        tag_loss(model, labels[:, :4])

    trainer = _lookup_trainer(tmp_path, "tag", lookup_weight=0.0, tag_weight=1.0, mark_layer=2, max_steps=30,
                              save_every=30, log_every=5, optim={"lr": 1e-2, "warmup_steps": 2})
    batch = trainer.task.batch([0, 1])
    image = batch["input_ids"] == trainer.model.config.image_token_id
    assert ((batch["tag_labels"] >= 0) <= image).all() and (batch["tag_labels"] > 0).any()
    final = Trainer(trainer.recipe, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "tag" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["tag_loss"] for r in rows if "tag_loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert not any("aux" in k for k in load_file(str(final / "model.safetensors")))


def test_on_image_tokens_places_values_in_order():
    from visor.train.lookup import on_image_tokens

    ids = torch.tensor([1, 5, 5, 2, 5, 0])
    assert on_image_tokens(ids, 5, torch.tensor([True, False, True])).tolist() == [False, True, False, False, True,
                                                                                  False]
    tags = on_image_tokens(ids, 5, torch.tensor([3, 0, 7]), fill=-100, what="tags")
    assert tags.tolist() == [-100, 3, 0, -100, 7, -100]
    with pytest.raises(ValueError, match="holds 3 image tokens, its tags 2"):
        on_image_tokens(ids, 5, torch.tensor([1, 2]), fill=-100, what="tags")
