"""A small Qwen2-style tokenizer for the checkpoints we build and train here.

Real LLaVA-OV checkpoints bring their own tokenizer. Ours must load the same way
(``AutoTokenizer.from_pretrained(dir)``, ``apply_chat_template``), so it is a Hugging Face fast
tokenizer built with the ``tokenizers`` library and saved with ``save_pretrained``.

Design:

* **Model**: a Unigram model over a fixed vocabulary, segmented by Viterbi (deterministic, no training
  run): every word of the benchmark's questions, answers and chat template is one piece (with and
  without the leading-space marker ``▁``), every printable ASCII character is a piece, and the 256
  ``<0xNN>`` byte pieces catch anything else (byte fallback), so *any* text round-trips exactly.
  Word pieces score far above character pieces, so a known word is one token, while codes and
  numbers, which are never vocabulary words, are spelt one character per token (``"47"`` ->
  ``4``, ``7``): any code or number is representable and digits are shared across families.
* **Pre-tokenizer** ``Metaspace`` (spaces become ``▁`` and start a new piece; no space is prepended),
  **decoder** ``▁`` -> space, byte fallback, fuse: ``decode(encode(text)) == text``.
* **Special tokens** (ids 0-3): ``<|endoftext|>`` (pad and unk), ``<|im_start|>``, ``<|im_end|>`` (eos,
  closes every turn), ``<image>`` (the image placeholder, exposed as ``tokenizer.image_token`` /
  ``image_token_id`` like LLaVA-OV's).
* **Chat template**: LLaVA-OV's Qwen2 format, ``<|im_start|>system\\nYou are a helpful assistant.
  <|im_end|>\\n`` (added when the conversation has no system turn), then per turn
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; content is a string or a list of parts where an
  image part renders as ``<image>\\n`` and a text part as its text; ``add_generation_prompt`` appends
  ``<|im_start|>assistant\\n``. Assistant content is wrapped in ``{% generation %}`` so
  ``return_assistant_tokens_mask`` works too.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN = SPECIAL_TOKENS
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
SPACE = "\u2581"  # ▁

CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORD = re.compile(r"[A-Za-z]+")


def benchmark_words() -> list[str]:
    """Every word of the procedural benchmark's questions and closed answers, plus chat-template words.

    Sorted, so the vocabulary (and every token id) is the same on every run.
    """
    from visor.data.synth.config import DOC_KEYS, SHAPES
    from visor.data.synth.families import ANSWER_WORDS, QUESTION_TEMPLATES

    words: set[str] = set()
    texts = [t for ts in QUESTION_TEMPLATES.values() for t in ts]
    texts += list(DOC_KEYS) + list(SHAPES) + list(ANSWER_WORDS)
    texts += ["system", "user", "assistant", DEFAULT_SYSTEM_PROMPT]
    for t in texts:
        words.update(w for w in _WORD.findall(t) if len(w) > 1)
    return sorted(words)


def build_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 4096):
    """Build the tokenizer (module doc) from ``words`` (default :func:`benchmark_words`).

    Returns a ``transformers.PreTrainedTokenizerFast``; save it with ``save_pretrained(dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_list = sorted(set(words if words is not None else benchmark_words()))
    chars = [c for c in string.printable if c not in " \x0b\x0c\r"]  # space is ▁; keep \n and \t
    vocab: list[tuple[str, float]] = [(tok, 0.0) for tok in SPECIAL_TOKENS]
    seen = set(SPECIAL_TOKENS)

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    add(SPACE, -10.0)
    for c in chars:
        add(c, -10.0)
    for c in chars:
        add(SPACE + c, -10.5)
    for w in word_list:
        if len(w) > 1:
            add(w, -2.0)
            add(SPACE + w, -2.0)
    for b in range(256):
        add(f"<0x{b:02X}>", -20.0)

    model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"extra_special_tokens": [IM_START, IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path, words: Iterable[str] | None = None) -> Path:
    """Build the tokenizer and ``save_pretrained`` it to ``out_dir``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(words).save_pretrained(str(out))
    return out


def load_tokenizer(folder: str | Path):
    """``AutoTokenizer.from_pretrained(folder)`` for a LLaVA-OV or VISOR checkpoint (or a tokenizer folder).

    The VISOR config class is registered first: AutoTokenizer reads the folder's ``config.json`` through
    AutoConfig, and an unknown ``model_type: visor`` makes transformers fall back with a misleading warning.
    """
    import visor.model.config  # noqa: F401  (registers model_type "visor" with AutoConfig)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
