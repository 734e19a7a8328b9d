"""``visor analyze``: the CKA estimator, the attention share against Hugging Face's eager attention weights,
layer dropping, and the CLI writing its CSV/PNG files on tiny LLaVA-OV and VISOR checkpoints."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tests.tiny import random_image, tiny_llava, tiny_llava_config
from visor import LayerPlan, VisorForConditionalGeneration
from visor.analysis.cka import cka_matrix, linear_cka
from visor.model.plan import LayerKind


# ---------------------------------------------------------------------- CKA
def test_cka_identical_states_give_one_and_unrelated_near_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    y = torch.randn(4000, 16, generator=gen)
    assert 0.0 <= linear_cka(x, y) < 0.02
    partly = x + 0.5 * y  # related: in between
    assert 0.3 < linear_cka(x, partly) < 1.0
    matrix = cka_matrix([x, partly, y])
    assert torch.allclose(matrix, matrix.T) and torch.all(matrix.diagonal() == 1)
    with pytest.raises(ValueError):
        linear_cka(x, y[:10])
    assert math.isnan(linear_cka(torch.ones(5, 3), x[:5]))


# ---------------------------------------------------------------------- attention share
def test_attention_share_matches_hugging_face_eager_attention():
    from tests.test_model import make_processor
    from visor.analysis.attention import image_attention_share
    from visor.analysis.common import walk_layers

    hf = tiny_llava(num_layers=3, heads=4, kv_heads=2)
    model = VisorForConditionalGeneration.from_llava_onevision(hf, plan=LayerPlan.all_self_attention(3))
    processor = make_processor(model)
    inputs = processor([processor.chat_prompt("which colour is the big square?")], [random_image(50, 70, 3)])
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                 output_attentions=True).attentions
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    queries = torch.arange(int(is_image.nonzero().max()) + 1, ids.numel())
    decoder = model.language_model
    shares = {}

    def before(index, kind, streams):
        shares[index] = image_attention_share(decoder.layers[index], decoder.rotary_emb, streams, queries, is_image)

    walk_layers(model, inputs, before=before)
    for layer in range(3):
        expected = ref[layer][0][:, queries][..., is_image].sum(-1).mean(0)
        share, uniform = shares[layer]
        assert torch.allclose(share, expected, atol=1e-5), layer
        assert torch.allclose(uniform, is_image.sum() / (queries + 1).float())


# ---------------------------------------------------------------------- layer dropping
def test_image_removed_runs_the_group_text_only_and_restores_the_plan():
    from visor.analysis.layer_drop import image_removed, layer_groups

    assert layer_groups(9) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert layer_groups(6, 4) == [(0, 1, 2, 3), (4, 5)]
    model = VisorForConditionalGeneration.from_llava_onevision(tiny_llava(num_layers=6))  # CA 1, 4; slots at 2, 5
    before = model.plan
    with image_removed(model, (0, 1, 2)) as slots:
        assert slots == (1,)
        kinds = model.plan.layer_kinds(slots)
        assert kinds[:3] == [LayerKind.TEXT_ONLY] * 3 and kinds[4] is LayerKind.CROSS_ATTENTION
        assert kinds[5] is LayerKind.SELF_ATTENTION
    assert model.plan == before
    base = VisorForConditionalGeneration.from_llava_onevision(tiny_llava(num_layers=4), plan=LayerPlan.all_self_attention(4))
    with image_removed(base, (2, 3)) as slots:
        assert slots == (0, 1)


# ---------------------------------------------------------------------- the CLI
def _save_checkpoint(folder, visor: bool):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor.data.tokenizer import build_tokenizer
    from visor.train.models import image_processor_for

    tok = build_tokenizer()
    config = tiny_llava_config(num_layers=6, hidden=32, image_size=32)
    config.text_config.vocab_size = len(tok)
    torch.manual_seed(0)
    llava = LlavaOnevisionForConditionalGeneration(config).eval()
    if visor:
        model = VisorForConditionalGeneration.from_llava_onevision(llava)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".cross_attn." in name:
                    p.normal_(0, 0.2)
        model.save_pretrained(str(folder))
    else:
        llava.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    image_processor_for(llava.config).save_pretrained(str(folder))


@pytest.mark.parametrize("visor", [False, True], ids=["llava-ov", "visor"])
def test_analyze_writes_csv_and_png(tmp_path, capsys, visor):
    from visor.cli.main import main

    folder, out = tmp_path / "model", tmp_path / "out"
    _save_checkpoint(folder, visor)
    # procedural items on the canvas the model was trained on (its recipe.json), as `visor eval` does
    (folder / "recipe.json").write_text(json.dumps({"kind": "base", "data": {"synth_image_size": 128}}))
    assert main(["analyze", "--model", str(folder), "--n", "4", "--families", "color", "code", "--group-size", "3",
                 "--max-new-tokens", "2", "--out", str(out), "--no-progress"]) == 0
    for name in ("attention", "cka", "layer_drop"):
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.png").stat().st_size > 0
    with open(out / "attention.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["layer"]) for r in rows} == set(range(6))
    assert {r["query"] for r in rows} == {"question", "answer"} and {r["difficulty"] for r in rows} == {"easy", "hard"}
    assert all(0.0 <= float(r["share"]) <= 1.0 for r in rows)
    with open(out / "cka.csv") as handle:
        rows = list(csv.DictReader(handle))
    states = sorted({r["state_a"] for r in rows})
    assert states == (["L2", "L5", "input"] if visor else sorted(["input"] + [f"L{i}" for i in range(6)]))
    assert all(float(r["cka"]) == pytest.approx(1.0) for r in rows if r["state_a"] == r["state_b"])
    with open(out / "layer_drop.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["group"] for r in rows} == {"0-2", "3-5"}
    captured = capsys.readouterr()
    assert "layer dropping" in captured.out and "128 px, the canvas" in captured.err
    assert json.loads((out / "analyze.json").read_text())["synth_image_size"] == 128
