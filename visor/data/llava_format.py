"""Read LLaVA conversation data, validate it item by item, and tokenise it with label masking.

**Format.** A record is ``{"id", "image": path | [paths], "conversations": [{"from": "human" |
"gpt" | "system", "value": "..."}], ...}``; ``<image>`` in a human turn marks where an image goes.
Extra keys (``grader``, ``family``, ``difficulty``, ``scene``, ...) are kept. Files are a JSON list
(``.json``, parsed whole, like LLaVA's own loaders) or JSON Lines (``.jsonl``, streamed line by
line, never held in memory). Image paths are relative to ``image_root`` (default: the data file's
folder).

**Validation.** Every record is either yielded or reported; the :class:`LoadReport` counts both, so a
skipped item never silently leaves a denominator (``n_seen == n_loaded + n_skipped``). Per case:

=====================  =========================================================================
malformed JSON line    skipped, reason names the line number and the parser's message
not an object / bad    skipped (``bad_record`` / ``bad_conversations``: missing or empty
conversations          ``conversations``, unknown role, non-string value, no ``gpt`` turn)
missing image file     skipped (``missing_image``) with the resolved path
corrupt/truncated      skipped (``corrupt_image``) with PIL's message; every image is opened,
image                  ``verify()``-ed and fully decoded (``verify_images=False`` skips this)
image but no tag       default: ``<image>\\n`` is prepended to the first human turn, one per image,
                       as LLaVA's training code does, and a warning (``image_tag_added``) is
                       recorded; ``missing_image_tag="skip"`` skips the item instead
more tags than images  skipped (``image_tag_mismatch``); an item with tags and no image too
unknown grader         skipped (``unknown_grader``), or ``unknown_grader="error"`` stops the run
                       with ``ValueError``; items without a ``grader`` get ``default_grader``
blank JSONL lines      ignored (they are not items)
=====================  =========================================================================

**Tokenisation.** :func:`encode_conversation` renders the conversation with the tokenizer's own chat
template (``apply_chat_template``), tokenises the whole text once (so tokens are exactly what the
tokenizer produces on the full prompt), marks as trainable the tokens that start inside an assistant
turn's span (its content and the end-of-turn token, ``<|im_end|>`` for Qwen2; not the role header,
not the newline after), and replaces the ``i``-th image token by ``image_token_counts[i]`` copies of
it, labelled -100. The per-image count comes from the model's processor (anyres: it depends on the
image size), so it is an argument here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100
ROLE_MAP: dict[str, str] = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
}


# ----------------------------------------------------------------------------------------------
# records and reports


@dataclass
class LlavaRecord:
    """One validated item. ``images`` are resolved paths; ``image_paths`` are as written in the file."""

    id: str
    images: list[Path]
    image_paths: list[str]
    conversations: list[dict[str, str]]
    grader: str | None = None
    family: str | None = None
    difficulty: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def question(self) -> str:
        """Text of the first human turn with image tags removed."""
        for turn in self.conversations:
            if ROLE_MAP[turn["from"]] == "user":
                return turn["value"].replace(IMAGE_TAG, "").strip()
        return ""

    def answer(self) -> str:
        """Value of the first gpt turn (the reference answer for evaluation)."""
        for turn in self.conversations:
            if ROLE_MAP[turn["from"]] == "assistant":
                return turn["value"]
        return ""

    def prompt_turns(self) -> list[dict[str, str]]:
        """The turns before the first gpt turn (what a model is given at evaluation)."""
        out = []
        for turn in self.conversations:
            if ROLE_MAP[turn["from"]] == "assistant":
                break
            out.append(turn)
        return out

    def load_images(self) -> list[Any]:
        """The images as RGB PIL images."""
        from PIL import Image

        out = []
        for p in self.images:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out


@dataclass(frozen=True)
class Problem:
    """A skipped item or a warning: where it is, its id if known, a reason code and a message."""

    where: str
    id: str | None
    code: str
    message: str

    def __str__(self) -> str:
        ident = f" id={self.id}" if self.id is not None else ""
        return f"{self.where}{ident}: {self.code}: {self.message}"


@dataclass
class LoadReport:
    """What a pass over a file saw: loaded, skipped (with reasons) and warned items."""

    path: str
    n_seen: int = 0
    n_loaded: int = 0
    skipped: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    complete: bool = False

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Skipped items per reason code."""
        out: dict[str, int] = {}
        for p in self.skipped:
            out[p.code] = out.get(p.code, 0) + 1
        return out

    def summary(self) -> str:
        """One human-readable paragraph."""
        lines = [f"{self.path}: {self.n_seen} items seen, {self.n_loaded} loaded, {self.n_skipped} skipped"
                 + ("" if self.complete else " (pass not finished)")]
        for code, n in sorted(self.counts().items()):
            lines.append(f"  skipped {n} x {code}")
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warnings (e.g. {self.warnings[0]})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "n_seen": self.n_seen, "n_loaded": self.n_loaded, "n_skipped": self.n_skipped,
            "skipped_by_reason": self.counts(), "n_warnings": len(self.warnings),
            "skipped": [str(p) for p in self.skipped], "warnings": [str(p) for p in self.warnings],
        }


class _Skip(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------------------------
# reading


def _iter_raw(path: Path) -> Iterator[tuple[str, Any, Exception | None]]:
    """(where, object or None, parse error or None) per item; JSONL is streamed."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    yield where, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield where, None, exc
    else:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)  # a malformed JSON list cannot be resynchronised: let it raise
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, obj in enumerate(data):
            yield f"{path.name}[{i}]", obj, None


def _verify_image(p: Path) -> None:
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:  # verify() leaves the file unusable and misses truncated pixel data
            im.load()
    except Exception as exc:  # PIL raises several types for bad files
        raise _Skip("corrupt_image", f"cannot decode image {p}: {type(exc).__name__}: {exc}") from None


class LlavaDataset:
    """Iterate over the valid records of a LLaVA JSON/JSONL file; :attr:`report` describes the pass.

    Each ``iter()`` starts a fresh pass and a fresh :attr:`report` (complete once the pass ends).
    Options are described in the module doc.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None, *, verify_images: bool = True,
                 missing_image_tag: str = "prepend", unknown_grader: str = "skip",
                 default_grader: str | None = None, known_graders: Iterable[str] | None = None):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if missing_image_tag not in ("prepend", "skip"):
            raise ValueError("missing_image_tag must be 'prepend' or 'skip'")
        if unknown_grader not in ("skip", "error"):
            raise ValueError("unknown_grader must be 'skip' or 'error'")
        self.verify_images = verify_images
        self.missing_image_tag = missing_image_tag
        self.unknown_grader = unknown_grader
        self.default_grader = default_grader
        if known_graders is None:
            from visor.eval.graders import grader_names

            known_graders = grader_names()
        self.known_graders = frozenset(known_graders)
        self.report = LoadReport(str(self.path))

    def __iter__(self) -> Iterator[LlavaRecord]:
        report = self.report = LoadReport(str(self.path))
        for where, obj, err in _iter_raw(self.path):
            report.n_seen += 1
            item_id = obj.get("id") if isinstance(obj, dict) else None
            item_id = str(item_id) if item_id is not None else None
            if err is not None:
                report.skipped.append(Problem(where, None, "malformed_json", f"invalid JSON: {err}"))
                continue
            try:
                record = self._record(where, obj, report)
            except _Skip as skip:
                report.skipped.append(Problem(where, item_id, skip.code, skip.message))
                continue
            report.n_loaded += 1
            yield record
        report.complete = True

    def _record(self, where: str, obj: Any, report: LoadReport) -> LlavaRecord:
        if not isinstance(obj, dict):
            raise _Skip("bad_record", f"expected a JSON object, got {type(obj).__name__}")
        item_id = str(obj["id"]) if obj.get("id") is not None else where
        convs = obj.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise _Skip("bad_conversations", "missing or empty 'conversations' list")
        turns = []
        for k, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ROLE_MAP or not isinstance(turn.get("value"), str):
                raise _Skip("bad_conversations", f"turn {k} must be {{'from': human|gpt|system, 'value': str}}, got {turn!r:.80}")
            turns.append({"from": turn["from"], "value": turn["value"]})
        if not any(ROLE_MAP[t["from"]] == "assistant" for t in turns):
            raise _Skip("bad_conversations", "no gpt turn (nothing to train on or grade against)")

        raw_images = obj.get("image", obj.get("images"))
        if raw_images is None:
            image_paths: list[str] = []
        elif isinstance(raw_images, str):
            image_paths = [raw_images]
        elif isinstance(raw_images, list) and all(isinstance(p, str) for p in raw_images):
            image_paths = list(raw_images)
        else:
            raise _Skip("bad_record", f"'image' must be a path or a list of paths, got {raw_images!r:.80}")

        n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
        if n_tags != len(image_paths):
            if n_tags == 0 and image_paths:
                if self.missing_image_tag == "skip":
                    raise _Skip("missing_image_tag", f"{len(image_paths)} image(s) but no {IMAGE_TAG} tag")
                first_user = next((t for t in turns if ROLE_MAP[t["from"]] == "user"), None)
                if first_user is None:
                    raise _Skip("missing_image_tag", "image given but no human turn to put the tag in")
                first_user["value"] = (IMAGE_TAG + "\n") * len(image_paths) + first_user["value"]
                report.warnings.append(Problem(where, item_id, "image_tag_added",
                                               f"no {IMAGE_TAG} tag for {len(image_paths)} image(s); prepended to the first human turn"))
            else:
                raise _Skip("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tag(s) but {len(image_paths)} image(s)")

        resolved = []
        for p in image_paths:
            full = Path(p) if Path(p).is_absolute() else self.image_root / p
            if not full.is_file():
                raise _Skip("missing_image", f"image file not found: {full}")
            if self.verify_images:
                _verify_image(full)
            resolved.append(full)

        grader = obj.get("grader", self.default_grader)
        if grader is not None and grader not in self.known_graders:
            message = f"unknown grader {grader!r}; known: {', '.join(sorted(self.known_graders))}"
            if self.unknown_grader == "error":
                raise ValueError(f"{where} id={item_id}: {message}")
            raise _Skip("unknown_grader", message)

        known = {"id", "image", "images", "conversations", "grader", "family", "difficulty"}
        return LlavaRecord(
            id=item_id, images=resolved, image_paths=image_paths, conversations=turns, grader=grader,
            family=obj.get("family"), difficulty=obj.get("difficulty"), source=where,
            extra={k: v for k, v in obj.items() if k not in known},
        )


def load_llava(path: str | Path, image_root: str | Path | None = None, **options: Any) -> tuple[list[LlavaRecord], LoadReport]:
    """Read a whole file into memory: ``(records, report)``. Options as :class:`LlavaDataset`."""
    ds = LlavaDataset(path, image_root, **options)
    records = list(ds)
    return records, ds.report


# ----------------------------------------------------------------------------------------------
# tokenisation


def to_messages(conversations: Sequence[dict], image_tag: str = IMAGE_TAG, parts: bool = True) -> list[dict]:
    """LLaVA turns (``from``/``value``) or chat messages (``role``/``content``) as chat messages.

    With ``parts=True`` a content becomes a list of ``{"type": "image"}`` / ``{"type": "text"}``
    parts, split at each image tag (one newline right after a tag is dropped: templates render an
    image part as the tag plus a newline, or put it before the text); otherwise it stays a string.
    """
    out = []
    for turn in conversations:
        if "from" in turn:
            role, value = ROLE_MAP[turn["from"]], turn["value"]
        else:
            role, value = turn["role"], turn["content"]
        if not parts or not isinstance(value, str):
            out.append({"role": role, "content": value})
            continue
        content: list[dict] = []
        pieces = value.split(image_tag)
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"type": "image"})
                if piece.startswith("\n"):
                    piece = piece[1:]
            if piece:
                content.append({"type": "text", "text": piece})
        out.append({"role": role, "content": content})
    return out


def _render(tokenizer: Any, messages: list[dict], chat_template: str | None, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def _render_messages(conversations: Sequence[dict], tokenizer: Any, image_tag: str, n_images: int,
                     chat_template: str | None) -> tuple[list[dict], str]:
    """Messages in the form (parts or plain strings) whose rendering has one tag per image."""
    for parts in (True, False):
        messages = to_messages(conversations, image_tag, parts=parts)
        text = _render(tokenizer, messages, chat_template, False)
        if text.count(image_tag) == n_images:
            return messages, text
    raise ValueError(f"the chat template renders {text.count(image_tag)} {image_tag} tag(s) for {n_images} image(s)")


def assistant_spans(messages: list[dict], tokenizer: Any, chat_template: str | None = None,
                    end_of_turn: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns to train on.

    A span starts where the template's generation prompt ends (the text a model would be asked to
    continue) and ends right after the first ``end_of_turn`` string in the turn (default: the
    tokenizer's ``eos_token``), or at the turn's end when there is none.
    """
    full = _render(tokenizer, messages, chat_template, False)
    eot = end_of_turn if end_of_turn is not None else getattr(tokenizer, "eos_token", None)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j], chat_template, False) if j else ""
        prompt = _render(tokenizer, messages[:j], chat_template, True)
        upto = _render(tokenizer, messages[: j + 1], chat_template, False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError("chat template is not prefix-stable: rendering a conversation's first turns "
                             "does not give a prefix of the whole rendering")
        if upto.startswith(prompt):
            start = len(prompt)
        else:  # generation prompt differs from the in-conversation header (e.g. a space vs a newline)
            content = message["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            idx = upto.find(text, len(before)) if text else -1
            start = idx if idx >= 0 else len(before)
        end = len(upto)
        if eot:
            k = upto.find(eot, start)
            if k >= 0:
                end = k + len(eot)
        spans.append((start, end))
    return full, spans


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{image_token!r} is not a single token of this tokenizer (got {ids}); add it as a special token")
    return ids[0]


def _expand(ids: list[int], labels: list[int], image_id: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != len(counts):
        raise ValueError(f"{len(positions)} image token(s) in the text but {len(counts)} image token count(s)")
    out_ids: list[int] = []
    out_labels: list[int] = []
    k = 0
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if t == image_id:
            n = int(counts[k])
            if n < 1:
                raise ValueError(f"image token count must be >= 1, got {n}")
            out_ids.extend([image_id] * n)
            out_labels.extend([IGNORE_INDEX] * n)
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def encode_conversation(conversations: Sequence[dict], tokenizer: Any, image_token_counts: Sequence[int],
                        image_token: str = IMAGE_TAG, chat_template: str | None = None,
                        end_of_turn: str | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation for training (module doc).

    ``conversations``: LLaVA turns or chat messages; ``image_token_counts[i]``: how many placeholder
    tokens the model's processor gives image ``i``; ``image_token``: the tag in the text, which must be
    one token of ``tokenizer``; ``chat_template``: overrides the tokenizer's; ``end_of_turn``: the
    string closing an assistant turn (default ``tokenizer.eos_token``).
    Labels are ``IGNORE_INDEX`` (-100) except on assistant-turn tokens (content + end-of-turn).
    """
    messages, _ = _render_messages(conversations, tokenizer, image_token, len(image_token_counts), chat_template)
    full, spans = assistant_spans(messages, tokenizer, chat_template, end_of_turn)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, _e) in enumerate(enc["offset_mapping"]):
        if any(a <= s < b for a, b in spans):
            labels[i] = ids[i]
    return _expand(ids, labels, _image_token_id(tokenizer, image_token), image_token_counts)


def encode_prompt(conversations: Sequence[dict], tokenizer: Any, image_token_counts: Sequence[int],
                  image_token: str = IMAGE_TAG, chat_template: str | None = None) -> list[int]:
    """``input_ids`` of a prompt for generation: the turns given, then the assistant generation prompt.

    Pass the turns before the answer (:meth:`LlavaRecord.prompt_turns`).
    """
    n = len(image_token_counts)
    for parts in (True, False):
        messages = to_messages(conversations, image_token, parts=parts)
        text = _render(tokenizer, messages, chat_template, True)
        if text.count(image_token) == n:
            break
    else:
        raise ValueError(f"the chat template renders {text.count(image_token)} {image_token} tag(s) for {n} image(s)")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    out, _ = _expand(ids, [IGNORE_INDEX] * len(ids), _image_token_id(tokenizer, image_token), image_token_counts)
    return out


def collate_tokens(batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                   padding_side: str = "right") -> dict[str, Any]:
    """Pad ``(input_ids, labels)`` pairs into torch tensors ``input_ids``, ``labels``, ``attention_mask``.

    Labels are padded with -100. Images (anyres pixel values of different sizes) are batched by the
    model's processor, not here.
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for b, (ids, labs) in enumerate(batch):
        k = len(ids)
        sl = slice(0, k) if padding_side == "right" else slice(n - k, n)
        input_ids[b, sl] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[b, sl] = torch.as_tensor(list(labs), dtype=torch.long)
        mask[b, sl] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
