"""Generation for VISOR: prefill once, then decode token by token with ``VisorCache``.

Our own loop (the cache is not a ``transformers.Cache``), but with ``GenerationMixin``'s option names and
its logits processors / stopping criteria, so temperature, top-k/top-p, repetition penalty, EOS and stop
strings behave exactly as users know them. Samples that ask for different active configurations are
generated in groups and returned in the original order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def _processors(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float | None, image_token_id: int) -> LogitsProcessorList:
    # the image placeholder is never a valid output: it would be read as an image slot on the next pass
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor([image_token_id])])
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


class StopStrings:
    """Stop a row once its generated text contains one of ``stop_strings``.

    Works on the decoded text, so it is independent of how the tokenizer splits a string into tokens
    (``transformers``' ``StopStringCriteria`` assumes a byte-level vocabulary).
    """

    def __init__(self, tokenizer, stop_strings: str | Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def __call__(self, generated: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=False)
        return torch.tensor([any(s in text for s in self.stop_strings) for text in texts], dtype=torch.bool)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    batch_num_images: Sequence[int] | None = None,
    *,
    active_sa=None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    image_features: list[torch.Tensor] | None = None,
    reducer=None,
    route: bool = False,
    budget: float = 0.0,
    image_tiled: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after each prompt; returns ``[B, N + new]`` (prompt + new tokens).

    Finished rows are filled with ``pad_token_id``. ``use_cache=False`` recomputes the whole sequence at
    every step (the reference the cached path is tested against). ``active_sa`` may be per sample.
    ``reducer`` (``Reducer`` or ``"NAME[:AMOUNT]"``, see ``visor.compression``) selects visual tokens once
    from the prompt: a pre-LLM one shortens the prompt before the first step (the caller's prompt is still
    what comes back), an in-LLM one prunes at prefill and the uncached path replays that selection.
    ``route``: the model's router picks each sample's configuration (``budget`` biases it towards cheaper
    ones, see ``visor.routing.router``); samples are grouped by decision, returned in the original order.
    ``image_tiled``: per image, anyres tiles or the base view only (``visor.model.resolution``; the processor
    and ``Batcher`` give it with ``resolution=``). A router that also picks the resolution needs the images
    to build a full layout: ``visor.routing.resolution.generate_on_request`` runs it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids must hold at least one token per sample")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("empty prompt: a sample has no unmasked token")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("a streamer supports batch size 1 only")
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_cfg is not None:
        eos_token_id = gen_cfg.eos_token_id
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = (gen_cfg.pad_token_id if gen_cfg is not None else None) or (eos[0] if eos else 0)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer (pass tokenizer=...)")
    stop_criteria = StopStrings(tokenizer, stop_strings) if stop_strings else None
    processors = _processors(do_sample, temperature, top_k, top_p, repetition_penalty, model.config.image_token_id)

    batch = input_ids.shape[0]
    prompt_ids, reduction, position_ids = input_ids, None, None
    if reducer is not None:  # visor.compression.apply: reduce once, from the prompt
        from visor.compression.apply import apply_pre_llm, prepare_reducer

        reducer = prepare_reducer(reducer)
        if reducer.stage == "pre_llm":
            reduction = apply_pre_llm(model, reducer, input_ids, attention_mask, None, None, pixel_values, image_sizes,
                                      batch_num_images, image_features, image_tiled=image_tiled)
            if reduction is not None:
                input_ids, attention_mask, image_features = reduction.input_ids, reduction.attention_mask, reduction.image_features
                position_ids = reduction.position_ids  # None: contiguous; set for a selector's original positions
            reducer = None
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values, image_sizes, batch_num_images, image_tiled)
    per_sample = model._assign_images(image_features or [], batch, batch_num_images)
    if route or budget:
        if active_sa is not None:
            raise ValueError("give either active_sa or route/budget, not both")
        from visor.routing.router import routes_resolution

        if routes_resolution(model):
            raise ValueError("this model's router also picks the resolution, which needs the images to build the "
                             "full layout: use visor.routing.resolution.generate_on_request")
        configs = model.route(input_ids, attention_mask, image_features=image_features or [],
                              batch_num_images=[len(p) for p in per_sample], budget=budget, position_ids=position_ids)
    else:
        configs = model.resolve_configs(active_sa, batch)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config, []).append(index)

    outputs: dict[int, torch.Tensor] = {}
    for config, members in groups.items():
        idx = torch.tensor(members, device=input_ids.device)
        feats = [f for i in members for f in per_sample[i]]
        counts = [len(per_sample[i]) for i in members]
        sequences = _generate_group(
            model, input_ids[idx], attention_mask[idx], feats, counts, config, max_new_tokens, do_sample,
            processors, eos, pad_token_id, stop_criteria, streamer, generator, use_cache, reducer,
            None if position_ids is None else position_ids[idx],
        )
        for row, i in zip(sequences, members):
            outputs[i] = row
    if reduction is not None:  # the caller's prompt, every image placeholder included, then the new tokens
        outputs = {i: torch.cat([prompt_ids[i], row[input_ids.shape[1]:]]) for i, row in outputs.items()}
    width = max(row.shape[0] for row in outputs.values())
    result = input_ids.new_full((batch, width), pad_token_id)
    for i, row in outputs.items():
        result[i, : row.shape[0]] = row
    return result


def _generate_group(model, input_ids, attention_mask, features, counts, config, max_new_tokens, do_sample,
                    processors, eos, pad_token_id, stop_criteria, streamer, generator, use_cache, reducer=None,
                    position_ids=None) -> torch.Tensor:
    """Decode one configuration group. ``position_ids``: the prompt's explicit positions (a selector's original
    ones; left padding, so the last column holds each sample's highest), new tokens continuing from the last."""
    batch = input_ids.shape[0]
    sequences = input_ids
    mask = attention_mask
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    cache = selection = None
    for step in range(max_new_tokens):
        if use_cache and cache is not None:
            out = model(sequences[:, -1:], attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        else:
            out = model(
                sequences, attention_mask=mask, image_features=features, batch_num_images=counts,
                active_sa=config, use_cache=use_cache, logits_to_keep=1, reducer=reducer, selection=selection,
                position_ids=position_ids,
            )
            selection = out.selection if reducer is not None else None  # ranked once, from the prompt
        cache = out.past_key_values if use_cache else None
        scores = processors(sequences, out.logits[:, -1].float())
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if position_ids is not None:  # the cached path continues from the prefill's own next position
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            unfinished &= ~torch.isin(next_tokens, torch.tensor(eos, device=next_tokens.device))
        if stop_criteria is not None:
            unfinished &= ~stop_criteria(sequences[:, input_ids.shape[1]:]).to(unfinished.device)
        if not unfinished.any():
            break
    if streamer is not None:
        streamer.end()
    return sequences
