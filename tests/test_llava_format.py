"""LLaVA-format reading, validation reports, tokenisation with label masking, round trip with the writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visor.data.llava_format import (
    IGNORE_INDEX,
    LlavaDataset,
    collate_tokens,
    encode_conversation,
    encode_prompt,
    load_llava,
    to_messages,
)
from visor.data.synth import FAMILIES, generate_items, write_split
from visor.data.tokenizer import build_tokenizer

# Hugging Face's LLaVA-OneVision processor template (images first, "role " header, text after "\n")
HF_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MULTI_TURN = [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "<image>\nWhat is the value of bar C?"},
    {"from": "gpt", "value": "47"},
    {"from": "human", "value": "And in this one?\n<image>"},
    {"from": "gpt", "value": "ACE"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _trained(tok, ids, labels) -> list[str]:
    return tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------
# tokenisation and masking


def test_label_masking_multi_turn(tok):
    ids, labels = encode_conversation(MULTI_TURN, tok, image_token_counts=[4, 6])
    assert len(ids) == len(labels)
    assert _trained(tok, ids, labels) == ["4", "7", "<|im_end|>", "A", "C", "E", "<|im_end|>"]
    assert ids.count(tok.image_token_id) == 10
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == tok.image_token_id)
    # labels equal ids wherever they are set
    assert all(lab == t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX)
    # the text (with one image token per image) is the chat template's rendering, tokenised once
    collapsed = []
    for t in ids:
        if t == tok.image_token_id and collapsed and collapsed[-1] == t:
            continue
        collapsed.append(t)
    assert tok.decode(collapsed) == tok.apply_chat_template(to_messages(MULTI_TURN), tokenize=False)


def test_masking_agrees_with_hf_assistant_mask(tok):
    messages = to_messages(MULTI_TURN)
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = encode_conversation(MULTI_TURN, tok, image_token_counts=[1, 1])
    assert ids == list(out["input_ids"])
    assert [int(lab != IGNORE_INDEX) for lab in labels] == list(out["assistant_masks"])


def test_masking_with_hf_llava_onevision_template(tok):
    ids, labels = encode_conversation(MULTI_TURN[1:], tok, [3, 2], chat_template=HF_LLAVA_OV_TEMPLATE)
    assert _trained(tok, ids, labels) == ["4", "7", "<|im_end|>", "A", "C", "E", "<|im_end|>"]
    assert ids.count(tok.image_token_id) == 5
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user <image><image><image>\nWhat is")


def test_encode_prompt_and_errors(tok):
    ids = encode_prompt(MULTI_TURN[:2], tok, [5])
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and ids.count(tok.image_token_id) == 5
    with pytest.raises(ValueError, match="image"):
        encode_conversation(MULTI_TURN, tok, [4])  # two tags, one count
    with pytest.raises(ValueError, match=">= 1"):
        encode_conversation(MULTI_TURN, tok, [4, 0])
    with pytest.raises(ValueError, match="single token"):
        encode_conversation([{"from": "human", "value": "<img> hi"}, {"from": "gpt", "value": "x"}], tok, [2],
                            image_token="<img>")


def test_collate_tokens():
    torch = pytest.importorskip("torch")
    batch = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])]
    out = collate_tokens(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = collate_tokens(batch, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert isinstance(out["input_ids"], torch.Tensor)


# ----------------------------------------------------------------------------------------------
# round trip


def test_round_trip_write_read_same_tokens_and_masks(tmp_path: Path, tok):
    n = 2 * len(FAMILIES)
    jsonl = write_split(tmp_path, "val", n, seed=4)
    items = list(generate_items("val", n, seed=4))
    ds = LlavaDataset(jsonl)
    records = list(ds)
    assert ds.report.complete and ds.report.n_seen == n and ds.report.n_loaded == n and ds.report.n_skipped == 0
    assert not ds.report.warnings
    for item, rec in zip(items, records):
        assert rec.id == item.id and rec.grader == item.grader
        assert rec.family == item.family and rec.difficulty == item.difficulty
        assert rec.question() == item.question and rec.answer() == item.answer
        assert rec.extra["scene"] == item.scene
        assert rec.load_images()[0].tobytes() == item.image.tobytes()
        counts = [7]
        assert encode_conversation(rec.conversations, tok, counts) == encode_conversation(item.conversations(), tok, counts)
        assert encode_prompt(rec.prompt_turns(), tok, counts) == encode_prompt(item.conversations()[:1], tok, counts)


def test_json_list_and_image_root(tmp_path: Path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (8, 8), "red").save(img_dir / "a.png")
    data = [{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                            {"from": "gpt", "value": "A"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    records, report = load_llava(path, image_root=img_dir, default_grader="exact")
    assert [r.id for r in records] == ["x"] and records[0].grader == "exact" and report.n_loaded == 1
    assert records[0].images == [img_dir / "a.png"]


# ----------------------------------------------------------------------------------------------
# bad input


def _conv(q: str = "<image>\nWhat?", a: str = "red") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_bad_inputs_are_reported_and_counted(tmp_path: Path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "blue").save(good)
    raw = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    lines = [
        json.dumps({"id": "ok", "image": "good.png", "conversations": _conv(), "grader": "exact"}),   # 1
        '{"id": "broken", "image": "good.png", "conversations": [',                                   # 2
        json.dumps({"id": "nofile", "image": "missing.png", "conversations": _conv()}),               # 3
        json.dumps({"id": "trunc", "image": "truncated.png", "conversations": _conv()}),              # 4
        json.dumps({"id": "garbage", "image": "garbage.png", "conversations": _conv()}),              # 5
        json.dumps({"id": "notag", "image": "good.png", "conversations": _conv(q="What?")}),          # 6
        json.dumps({"id": "twotags", "image": "good.png", "conversations": _conv(q="<image><image>Q")}),  # 7
        json.dumps({"id": "badgrader", "image": "good.png", "conversations": _conv(), "grader": "bleu"}),  # 8
        "[1, 2, 3]",                                                                                   # 9
        json.dumps({"id": "noanswer", "conversations": [{"from": "human", "value": "hi"}]}),           # 10
        "",                                                                                            # 11 (blank)
        json.dumps({"id": "textonly", "conversations": _conv(q="Hi?")}),                              # 12
        json.dumps({"id": "badrole", "conversations": [{"from": "robot", "value": "x"}]}),            # 13
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")

    ds = LlavaDataset(path)
    records = list(ds)
    report = ds.report
    assert [r.id for r in records] == ["ok", "notag", "textonly"]
    assert report.n_seen == 12  # the blank line is not an item
    assert report.n_seen == report.n_loaded + report.n_skipped
    assert report.counts() == {"malformed_json": 1, "missing_image": 1, "corrupt_image": 2, "image_tag_mismatch": 1,
                               "unknown_grader": 1, "bad_record": 1, "bad_conversations": 2}
    by_id = {p.id: p for p in report.skipped}
    assert report.skipped[0].where == "data.jsonl:2" and report.skipped[0].code == "malformed_json"
    assert "missing.png" in by_id["nofile"].message
    assert by_id["trunc"].where == "data.jsonl:4"
    assert "bleu" in by_id["badgrader"].message
    assert "no gpt turn" in by_id["noanswer"].message
    # image without a tag: tag prepended, warning recorded
    assert records[1].conversations[0]["value"] == "<image>\nWhat?"
    assert [(w.id, w.code) for w in report.warnings] == [("notag", "image_tag_added")]
    summary = report.summary()
    assert "12 items seen, 3 loaded, 9 skipped" in summary and "corrupt_image" in summary
    assert report.to_dict()["skipped_by_reason"]["corrupt_image"] == 2

    # stricter policies
    strict = LlavaDataset(path, missing_image_tag="skip")
    assert [r.id for r in strict] == ["ok", "textonly"] and strict.report.counts()["missing_image_tag"] == 1
    with pytest.raises(ValueError, match="unknown grader 'bleu'"):
        list(LlavaDataset(path, unknown_grader="error"))
    # without image verification the truncated file passes the reader (only existence is checked)
    lax = LlavaDataset(path, verify_images=False)
    assert "trunc" in [r.id for r in lax]


def test_jsonl_is_streamed(tmp_path: Path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(1000):
            fh.write(json.dumps({"id": i, "conversations": _conv(q="Q?")}) + "\n")
    ds = LlavaDataset(path)
    it = iter(ds)
    first = next(it)
    assert first.id == "0" and ds.report.n_seen == 1 and not ds.report.complete
    rest = list(it)
    assert len(rest) == 999 and ds.report.complete and ds.report.n_loaded == 1000
