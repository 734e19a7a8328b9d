"""Core model: parity with Hugging Face, the three layer kinds, cached generation, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import (
    IMAGE_TOKEN_ID, random_image, randomise_cross_attention, save_tiny_llava, tiny_image_processor, tiny_llava,
    tiny_tokenizer,
)
from visor import LayerPlan, VisorForConditionalGeneration
from visor.model.layers import DecoderLayer
from visor.model.plan import LayerKind
from visor.processing.processor import ImageGeometry, VisorProcessor


# ---------------------------------------------------------------------- helpers
def make_processor(model) -> VisorProcessor:
    return VisorProcessor(tiny_tokenizer(), tiny_image_processor(model.config), ImageGeometry.from_config(model.config), IMAGE_TOKEN_ID)


def batch_inputs(model, sizes=((50, 70), (40, 90)), questions=("what is it?", "which colour is the big square?"), seed=0):
    processor = make_processor(model)
    prompts = [processor.chat_prompt(q) for q in questions]
    images = [random_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    return processor(prompts, images)




def text_logits_from_hf(hf_logits: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    return hf_logits.gather(1, text_index.clamp(min=0)[..., None].expand(-1, -1, hf_logits.shape[-1]))


# ---------------------------------------------------------------------- plan
def test_default_plan_is_pinned():
    plan = LayerPlan.default(24)
    assert plan.cross_attention_layers == tuple(range(1, 24, 3))
    assert plan.self_attention_layers == tuple(range(2, 24, 3))
    plan28 = LayerPlan.default(28)
    assert plan28.num_slots == 9
    text_only = [i for i in range(28) if i not in plan28.cross_attention_layers and i not in plan28.self_attention_layers]
    assert text_only == list(range(0, 28, 3))
    assert plan.describe([0, 7]).startswith(".CS.Cs")
    assert plan.parse_slots("0+2") == (0, 2)
    assert plan.first_slots(3) == (0, 1, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_layers=24, cross_attention_layers=(1, 30), self_attention_layers=()), "layer"),
        (dict(num_layers=24, cross_attention_layers=(1, 2), self_attention_layers=(2, 5)), "both"),
        (dict(num_layers=0, cross_attention_layers=(), self_attention_layers=()), "positive"),
    ],
)
def test_bad_plans_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerPlan(**kwargs)


def test_active_slot_outside_plan_is_rejected():
    with pytest.raises(ValueError, match="not in the plan"):
        LayerPlan.default(9).resolve_active([3])
    with pytest.raises(ValueError, match="parse"):
        LayerPlan.default(9).parse_slots("0,2")


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    "config_kwargs",
    [
        dict(num_layers=5, heads=4, kv_heads=2),  # odd layer count, GQA
        dict(num_layers=4, heads=4, kv_heads=4, tie=True),  # MHA, tied embeddings
        dict(num_layers=3, heads=4, kv_heads=1, max_views=1),  # anyres_max shrinking kicks in
    ],
)
def test_all_self_attention_matches_hugging_face(config_kwargs):
    hf = tiny_llava(**config_kwargs)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf, plan=LayerPlan.all_self_attention(hf.config.text_config.num_hidden_layers))
    inputs = batch_inputs(visor, sizes=((50, 70), (30, 45)))
    assert inputs["attention_mask"].min() == 0, "the batch must contain padding"
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions,
                 pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
        out = visor(**inputs)
    valid = out.text_index >= 0
    diff = (text_logits_from_hf(ref, out.text_index) - out.logits)[valid].abs().max()
    assert diff <= 1e-4


def test_multi_image_prompt_matches_hugging_face():
    hf = tiny_llava(num_layers=3)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf, plan=LayerPlan.all_self_attention(3))
    processor = make_processor(visor)
    prompt = processor.chat_prompt("compare them", num_images=2)
    inputs = processor([prompt], [[random_image(50, 70, 1), random_image(30, 30, 2)]])
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                 batch_num_images=torch.tensor(inputs["batch_num_images"])).logits
        out = visor(**inputs)
    assert (text_logits_from_hf(ref, out.text_index) - out.logits).abs().max() <= 1e-4


def test_placeholder_count_matches_hugging_face_processor():
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    hf = tiny_llava(num_layers=3)
    geometry = ImageGeometry.from_config(hf.config)
    ref = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # only its token-count arithmetic is used
    ref.image_processor = tiny_image_processor(hf.config)
    ref.num_image_tokens = (hf.config.vision_config.image_size // hf.config.vision_config.patch_size) ** 2
    ref.vision_aspect_ratio = hf.config.vision_aspect_ratio
    base = hf.config.vision_config.image_size
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    for h, w in [(32, 32), (50, 70), (90, 40), (200, 31), (31, 200), (96, 96), (65, 64)]:
        expected = ref._get_number_of_features(h, w, base, base)
        assert geometry.num_tokens((h, w)) == expected
        processed = tiny_image_processor(hf.config)([random_image(h, w)], return_tensors="pt")
        with torch.no_grad():
            feats = visor.encode_images(processed["pixel_values"], processed["image_sizes"])
        assert feats[0].shape[0] == expected


def test_real_geometry_converts_on_meta_device():
    from importlib.resources import files

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    for name, layers, published in [("0.5b", 24, 0.894e9), ("1.5b", 28, None)]:
        path = files("visor.configs") / f"llava-onevision-qwen2-{name}-ov-hf" / "config.json"
        model = VisorForConditionalGeneration.from_llava_onevision(str(path), device="meta")
        config = LlavaOnevisionConfig.from_pretrained(str(path.parent))
        with torch.device("meta"):
            hf = LlavaOnevisionForConditionalGeneration(config)
        hf_params = sum(p.numel() for p in hf.parameters())
        ca_params = sum(p.numel() for n, p in model.named_parameters() if ".cross_attn." in n)
        assert sum(p.numel() for p in model.parameters()) == hf_params + ca_params
        assert model.lm_head.weight is model.language_model.embed_tokens.weight
        assert model.config.vision_feature_layer == -1 and len(model.config.image_grid_pinpoints) == 36
        assert model.plan == LayerPlan.default(layers)
        hidden, kv = config.text_config.hidden_size, config.text_config.num_key_value_heads
        head = hidden // config.text_config.num_attention_heads
        per_block = 2 * hidden + 7 * hidden + hidden + 2 * (hidden * head * kv + head * kv) + hidden * hidden + hidden + hidden * hidden
        assert ca_params == (layers // 3) * per_block
        if published:
            assert abs(hf_params - published) / published < 0.002


# ---------------------------------------------------------------------- layer kinds
def test_fresh_conversion_without_sa_equals_text_only_decoder():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    inputs = batch_inputs(visor)
    with torch.no_grad():
        out = visor(**inputs, active_sa=[])
    lm = hf.model.language_model
    for b in range(2):
        keep = (inputs["input_ids"][b] != IMAGE_TOKEN_ID) & inputs["attention_mask"][b].bool()
        positions = ((inputs["attention_mask"][b].cumsum(-1) - 1).clamp(min=0))[keep]
        with torch.no_grad():
            hidden = lm(input_ids=inputs["input_ids"][b][keep][None], position_ids=positions[None]).last_hidden_state
            ref = hf.lm_head(hidden)[0]
        mine = out.logits[b][out.text_index[b] >= 0]
        assert (mine - ref).abs().max() <= 1e-4

    # one optimiser step on a loss that reaches the CA blocks: the result must now differ
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    ca_params = [p for n, p in visor.named_parameters() if ".cross_attn." in n]
    optim = torch.optim.SGD(ca_params, lr=1.0)
    visor.train()
    visor(**inputs, active_sa=[], labels=labels).loss.backward()
    optim.step()
    visor.eval()
    with torch.no_grad():
        after = visor(**inputs, active_sa=[])
    assert (after.logits - out.logits).abs().max() > 1e-3


def test_visual_states_change_only_in_sa_layers_and_ca_reads_latest():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    inputs = batch_inputs(visor)
    with torch.no_grad():
        features = visor.encode_images(inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"])
        ca_only = visor(**inputs, active_sa=[], return_visual_states=True)
    for b, feats in enumerate(features):
        assert torch.equal(ca_only.visual_states[b, : feats.shape[0]], feats)

    # record what each layer is given and what each CA block reads
    seen_tokens, ca_reads = {}, {}
    hooks = []
    for index, layer in enumerate(visor.language_model.layers):
        def record(module, args, output, index=index):
            seen_tokens[index] = args[0].shape[1]

        hooks.append(layer.register_forward_hook(record))
        if layer.cross_attn is not None:
            original = layer.cross_attn.visual_keys_values

            def reading(visual, image_ids, original=original, index=index):
                ca_reads[index] = visual.clone()
                return original(visual, image_ids)

            layer.cross_attn.visual_keys_values = reading
    with torch.no_grad():
        out = visor(**inputs, active_sa=[0], return_visual_states=True)
    for hook in hooks:
        hook.remove()
    n_total, n_text = inputs["input_ids"].shape[1], out.logits.shape[1]
    kinds = visor.plan.layer_kinds([0])
    for index, kind in enumerate(kinds):
        expected = n_total if kind is LayerKind.SELF_ATTENTION else n_text
        assert seen_tokens[index] == expected, f"layer {index} ({kind.value}) saw {seen_tokens[index]} tokens"
    # layer 1 (CA) reads the projector output; layer 4 (CA, after SA layer 2) reads layer 2's visual output
    assert torch.equal(ca_reads[1][0, : features[0].shape[0]], features[0])
    assert not torch.allclose(ca_reads[4][0, : features[0].shape[0]], features[0])
    assert torch.equal(ca_reads[4], out.visual_states)


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("active_sa", [None, [], [0], [1], [[0, 1], []]])
def test_cached_generation_equals_uncached(active_sa):
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    inputs = batch_inputs(visor)
    cached = visor.generate(**inputs, active_sa=active_sa, max_new_tokens=6)
    uncached = visor.generate(**inputs, active_sa=active_sa, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    sampled = [visor.generate(**inputs, active_sa=active_sa, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20,
                              top_p=0.9, generator=torch.Generator().manual_seed(3), use_cache=c) for c in (True, False)]
    assert torch.equal(*sampled)


def test_cached_decode_logits_equal_full_recompute():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    inputs = batch_inputs(visor)
    new = torch.tensor([[10, 11, 12], [13, 14, 15]])
    with torch.no_grad():
        for active in ([], [0], [0, 1]):
            prefill = visor(**inputs, active_sa=active, use_cache=True)
            step = visor(new, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1),
                         past_key_values=prefill.past_key_values)
            full = visor(torch.cat([inputs["input_ids"], new], 1), attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1),
                         pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], active_sa=active)
            assert (step.logits - full.logits[:, -3:]).abs().max() <= 1e-4


def test_kv_cache_holds_per_kind_tokens():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    inputs = batch_inputs(visor)
    with torch.no_grad():
        cache = visor(**inputs, active_sa=[0], use_cache=True).past_key_values
    n_total = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).max())
    for index, kind in enumerate(cache.kinds):
        own = cache.self_kv[index].key.shape[2]
        if kind is LayerKind.SELF_ATTENTION:
            assert own == n_total and cache.cross_kv[index].key is None
        else:
            assert own < n_total - n_visual + n_visual // 2  # text only
        if kind is LayerKind.CROSS_ATTENTION:
            assert cache.cross_kv[index].key.shape[2] == n_visual


def test_text_only_prompt_and_mixed_batch():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    processor = make_processor(visor)
    prompts = [processor.chat_prompt("hello there", num_images=0), processor.chat_prompt("what is it?")]
    inputs = processor(prompts, [[], [random_image(50, 70)]])
    both = visor.generate(**inputs, active_sa=[0], max_new_tokens=4)
    alone = visor.generate(**processor(prompts[:1]), active_sa=[0], max_new_tokens=4)
    assert torch.equal(both[0, -4:], alone[0, -4:])
    with torch.no_grad():
        cache = visor(**processor(prompts[:1]), active_sa=[], use_cache=True).past_key_values
    assert all(slot.key is None for slot in cache.cross_kv), "a text-only prompt must not run cross-attention"


def test_generation_options_and_streamer():
    from transformers.generation.streamers import BaseStreamer

    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    processor = make_processor(visor)
    inputs = processor(processor.chat_prompt("what is it?"), [random_image(40, 40)])

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = visor.generate(**inputs, max_new_tokens=5, repetition_penalty=1.3, streamer=streamer)
    assert streamer.ended and len(streamer.chunks) == 1 + (out.shape[1] - inputs["input_ids"].shape[1])
    first = int(out[0, inputs["input_ids"].shape[1]])
    stopped = visor.generate(**inputs, max_new_tokens=5, repetition_penalty=1.3, eos_token_id=first, pad_token_id=0)
    assert stopped.shape[1] == inputs["input_ids"].shape[1] + 1
    text = processor.tokenizer.decode([first])
    by_string = visor.generate(**inputs, max_new_tokens=5, repetition_penalty=1.3, stop_strings=[text], tokenizer=processor.tokenizer)
    assert by_string.shape[1] == inputs["input_ids"].shape[1] + 1
    assert not (out == IMAGE_TOKEN_ID)[0, inputs["input_ids"].shape[1]:].any()


# ---------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText

    hf = tiny_llava(num_layers=6, tie=True)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    visor.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    inputs = batch_inputs(visor)
    for loader in (VisorForConditionalGeneration.from_pretrained, AutoModel.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        loaded = loader(tmp_path / "ckpt")
        assert isinstance(loaded, VisorForConditionalGeneration)
        assert loaded.plan == visor.plan
        with torch.no_grad():
            for active in ([], [1]):
                assert torch.equal(loaded(**inputs, active_sa=active).logits, visor(**inputs, active_sa=active).logits)


def test_convert_from_folder_and_cli(tmp_path, capsys):
    import json

    from visor.cli.main import main

    hf = save_tiny_llava(tmp_path / "llava", num_layers=6)
    assert main(["convert", str(tmp_path / "llava"), str(tmp_path / "visor")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["plan"]["cross_attention_layers"] == [1, 4]
    converted = VisorForConditionalGeneration.from_pretrained(tmp_path / "visor")
    for name, tensor in hf.state_dict().items():
        from visor.convert.keys import hf_to_visor_key, visor_to_hf_key

        ours = hf_to_visor_key(name)
        assert torch.equal(converted.state_dict()[ours], tensor), name
        assert visor_to_hf_key(ours) == name
    random_image(50, 70).save(tmp_path / "img.png")
    assert main(["generate", "--model", str(tmp_path / "visor"), "--image", str(tmp_path / "img.png"),
                 "--prompt", "what is it?", "--sa-count", "1", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["layers"] == ".CS.Cs" and result["visual_tokens"] > 0


# ---------------------------------------------------------------------- bad input
def test_per_sample_image_token_mismatch_is_caught():
    hf = tiny_llava(num_layers=3)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    inputs = batch_inputs(visor)
    ids = inputs["input_ids"].clone()
    # move one placeholder from sample 0 to sample 1: the batch total still matches
    first_image_0 = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    text_1 = int(((ids[1] != IMAGE_TOKEN_ID) & inputs["attention_mask"][1].bool()).nonzero()[-1])
    ids[0, first_image_0] = 20
    ids[1, text_1] = IMAGE_TOKEN_ID
    assert (ids == IMAGE_TOKEN_ID).sum() == (inputs["input_ids"] == IMAGE_TOKEN_ID).sum()
    with pytest.raises(ValueError, match="sample 0"):
        visor(**{**inputs, "input_ids": ids})


def test_bad_images_prompts_and_plans(tmp_path):
    from visor.processing.processor import ImageLoadError, load_image

    random_image(40, 40).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    for name in ("truncated.png", "garbage.png", "missing.png"):
        with pytest.raises(ImageLoadError):
            load_image(tmp_path / name)
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    processor = make_processor(visor)
    with pytest.raises(ValueError, match="empty"):
        processor("")
    with pytest.raises(ValueError, match="tag"):
        processor("no tag here", [random_image(30, 30)])
    with pytest.raises(ValueError, match="empty prompt"):
        visor.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="24 layers"):
        VisorForConditionalGeneration.from_llava_onevision(hf, plan=LayerPlan.default(24))


def test_broken_checkpoint_folders(tmp_path):
    from safetensors.torch import load_file, save_file

    from visor.convert.checkpoint import CheckpointError

    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    visor.save_pretrained(tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))

    def variant(name, tensors):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    missing = {k: v for k, v in state.items() if "layers.2.mlp.up_proj" not in k}
    with pytest.raises(CheckpointError, match="missing"):
        VisorForConditionalGeneration.from_pretrained(variant("missing", missing))
    mismatched = dict(state)
    key = "language_model.layers.1.cross_attn.q_proj.weight"
    mismatched[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError):
        VisorForConditionalGeneration.from_pretrained(variant("mismatched", mismatched))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        VisorForConditionalGeneration.from_pretrained(tmp_path / "empty")
    # a LLaVA-OV folder whose tensors are missing fails conversion with a clear message
    hf.save_pretrained(tmp_path / "llava")
    llava_state = load_file(str(tmp_path / "llava" / "model.safetensors"))
    llava_state.pop(next(k for k in llava_state if "mlp.down_proj" in k))
    save_file(llava_state, str(tmp_path / "llava" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        VisorForConditionalGeneration.from_llava_onevision(tmp_path / "llava")


def test_per_sample_configurations_equal_separate_runs():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    inputs = batch_inputs(visor)
    with torch.no_grad():
        mixed = visor(**inputs, active_sa=[[0], [0, 1]])
        for b, active in enumerate(([0], [0, 1])):
            alone = visor(**inputs, active_sa=active)
            mine, theirs = mixed.text_index[b] >= 0, alone.text_index[b] >= 0
            assert torch.equal(mixed.text_index[b][mine], alone.text_index[b][theirs])
            assert torch.allclose(mixed.logits[b][mine], alone.logits[b][theirs], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(hf)
    randomise_cross_attention(visor)
    inputs = batch_inputs(visor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    grads = []
    for checkpointing in (False, True):
        visor.zero_grad()
        visor.train()
        visor.language_model.gradient_checkpointing = checkpointing
        visor(**inputs, active_sa=[0], labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in visor.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def _right_pad(batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The same rows with their real tokens moved to the front (right padding)."""
    mask = batch["attention_mask"].bool()
    order = torch.argsort((~mask).int(), dim=1, stable=True)  # real tokens first, in order
    moved = {**batch, "input_ids": batch["input_ids"].gather(1, order), "attention_mask": batch["attention_mask"].gather(1, order)}
    return moved, labels.gather(1, order)


@pytest.mark.parametrize("plan, active_sa", [("all_sa", None), ("visor", [0]), ("visor", []), ("visor", [[0], [0, 1]])])
def test_right_padded_batch_equals_left_padded_and_skips_attention_masks(plan, active_sa, monkeypatch):
    """Training batches are right-padded so causal attention runs as SDPA's ``is_causal`` (no mask); the
    loss, its gradients and every real position's logits equal the left-padded batch's."""
    import visor.model.modeling as modeling

    hf = tiny_llava(num_layers=6)
    visor = VisorForConditionalGeneration.from_llava_onevision(
        hf, plan=LayerPlan.all_self_attention(6) if plan == "all_sa" else None)
    if plan == "visor":
        randomise_cross_attention(visor)
    visor.train()
    left = batch_inputs(visor)
    assert not left["attention_mask"].bool().all()
    labels = left["input_ids"].masked_fill(left["input_ids"] == IMAGE_TOKEN_ID, -100).masked_fill(left["attention_mask"] == 0, -100)
    right, right_labels = _right_pad(left, labels)

    causal = []  # is_causal of every causal mask the decoder builds (text stream, full sequence)
    build = modeling.causal_mask

    def recording(*args):
        mask = build(*args)
        causal.append(mask.is_causal)
        return mask

    monkeypatch.setattr(modeling, "causal_mask", recording)
    outputs, grads, kinds = [], [], []
    for inputs, lab in ((left, labels), (right, right_labels)):
        causal.clear()
        visor.zero_grad()
        out = visor(**inputs, labels=lab, active_sa=active_sa, loss_reduction="sum")
        out.loss.backward()
        outputs.append((out, inputs["attention_mask"]))
        grads.append({n: p.grad.clone() for n, p in visor.named_parameters() if p.grad is not None})
        kinds.append(list(causal))
    assert kinds[0] and not all(kinds[0])  # left padding: masks (a one-sample group without padding needs none)
    assert kinds[1] and all(kinds[1])  # right padding: SDPA's is_causal everywhere
    (l_out, _), (r_out, _) = outputs
    assert l_out.num_loss_tokens == r_out.num_loss_tokens > 0
    assert torch.allclose(l_out.loss, r_out.loss, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name
    # logits of every real input position, matched through text_index (positions moved with the padding)
    for b in range(left["input_ids"].shape[0]):
        real = left["attention_mask"][b].bool()
        to_right = torch.cumsum(real.long(), 0) - 1  # left position -> right position of a real token
        l_rows = {int(to_right[p]): l_out.logits[b, s] for s, p in enumerate(l_out.text_index[b].tolist()) if p >= 0 and real[p]}
        r_rows = {p: r_out.logits[b, s] for s, p in enumerate(r_out.text_index[b].tolist()) if p >= 0 and right["attention_mask"][b, p]}
        assert l_rows.keys() == r_rows.keys() and l_rows
        for p in l_rows:
            assert torch.allclose(l_rows[p], r_rows[p], atol=1e-5), (b, p)
