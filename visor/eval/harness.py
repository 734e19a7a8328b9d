"""Evaluation harness: any model (LLaVA-OV or VISOR checkpoint), any dataset (procedural or LLaVA
format), any active configuration; reducers and routing plug in through ``generate_kwargs``.

Per item: batched greedy generation, the item's grader, the configuration it ran with, the visual and
text tokens of its prompt and its LLM prefill FLOPs from the analytic cost model (``visor.cost``:
``count_prefill`` with the model's plan, the item's active SA slots, the checkpoint's ``ca_kv_layout``
and, under a reducer, the visual tokens each layer really sees plus the selection overhead). The vision
encoder and projector are counted on their own (``vision_flops``), never inside ``llm_flops``.

**Nothing leaves a denominator silently.** Every item the dataset holds becomes one line of
``predictions.jsonl`` and one entry of ``n_items``. An item that cannot be run keeps ``score=None``, a
``problem`` saying why, counts as 0 in its family's mean and is counted in ``n_skipped``. What happens
per kind of bad input (LLaVA-format files; :func:`llava_items` and ``visor eval``):

======================  ======================================================================
missing image file      skipped and counted (``missing_image`` + the resolved path)
corrupt / truncated     skipped and counted (``corrupt_image`` + PIL's message); every image is
image                   opened, verified and fully decoded before the run
image but no <image>    run, with a warning on the item (``image_tag_added``): ``<image>\\n`` is
tag                     prepended to the first human turn, as LLaVA's own code does
                        (``missing_image_tag="skip"`` skips and counts it instead)
malformed JSON line     skipped and counted (``malformed_json`` + line number and parser message)
(JSONL)                 under the family ``(unreadable)``: its family is unknown, so it is in
                        ``n_items``, ``n_skipped`` and ``overall_mean`` but in neither
                        ``easy_mean`` nor ``hard_mean``
malformed ``.json``     the run stops (``ValueError``): a broken JSON list cannot be resynchronised
list                    into items
other bad records       skipped and counted (``bad_record`` / ``bad_conversations`` /
                        ``image_tag_mismatch``)
unknown grader          ``visor eval`` stops before any generation (``UnknownGraderError`` naming
                        every such item and the known graders): a grader typo would otherwise
                        score a whole family 0. The library default (``llava_items(...,
                        unknown_grader="skip")``, used by the training loop's periodic
                        evaluation) skips and counts them (``unknown_grader``) instead
same family under two   the run stops before any generation (``ValueError``)
difficulties
prompt the chat         skipped and counted (``bad_prompt``), found at batching time
template cannot render
prompt too long         skipped and counted (``prompt_too_long``): longer than
                        ``max_position_embeddings - max_new_tokens``
image gone at run time  skipped and counted (``image_error``): read fine, unreadable when batched
blank JSONL line        ignored: not an item (so ``n_items`` = the file's non-blank lines)
======================  ======================================================================

A skipped item whose record still names its ``family`` (a missing image, say) counts in that family,
so it lowers ``easy_mean`` / ``hard_mean`` like a wrong answer; when only the family is given, the
difficulty comes from the other items of that family. ``mean_flops`` averages the items that ran
(a skipped item has no prompt to cost). A text-only item (no image) costs its text through every layer
(no visual token exists for SA or CA to read).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from visor.data.batch import Batcher, Sample, count_tokens
from visor.eval.graders import UnknownGraderError, aggregate, edit_similarity, get_grader, grader_names
from visor.model.plan import format_slots

UNREADABLE_FAMILY = "(unreadable)"


@dataclass
class EvalItem:
    """One question to evaluate.

    ``images``: PIL images or image file paths (loaded at batching time, so a large dataset is never
    held in memory). ``turns``: the LLaVA turns given to the model (before the reference answer).
    ``problem``: set when the item cannot be run; it then scores ``None`` (module docstring).
    ``warning``: something the reader changed about the item (e.g. an image tag it added).
    """

    id: str
    family: str
    difficulty: str
    grader: str
    images: list
    turns: list[dict]
    answers: list[str]
    problem: str | None = None
    reason: str | None = None  # short code of the problem (``missing_image``, ``malformed_json``, ...)
    warning: str | None = None


@dataclass
class ItemResult:
    id: str
    family: str
    difficulty: str
    grader: str
    answer: str
    prediction: str | None
    score: float | None
    active_sa: str | None = None
    llm_flops: float | None = None
    vision_flops: float | None = None
    visual_tokens: int | None = None  # visual tokens entering the LLM (after a pre-LLM reducer)
    text_tokens: int | None = None
    new_tokens: int | None = None
    problem: str | None = None
    reason: str | None = None
    warning: str | None = None
    resolution: str | None = None  # "full" (base + tiles) or "base" (base view only): visor.model.resolution
    vision_crops: int | None = None  # crops the vision tower encoded for this item (the routing pass's included)
    similarity: float | None = None  # edit similarity to the answer (visor.eval.graders.edit_similarity)


@dataclass
class EvalResult:
    items: list[ItemResult]
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> None:
        """``predictions.jsonl`` (one line per item, dataset order) and ``summary.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
            for item in self.items:
                handle.write(json.dumps(asdict(item)) + "\n")
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------- datasets
def synth_items(split: str, n: int, seed: int = 0, config=None, families: Sequence[str] | None = None,
                question_first: bool = False) -> list[EvalItem]:
    """Items of the procedural benchmark, generated on the fly (deterministic in split/seed/index;
    identical to what ``visor data synth`` writes with the same arguments). ``question_first``: the prompt puts
    the question before the image (``SynthItem.conversations``)."""
    from visor.data.synth.config import DEFAULT_CONFIG
    from visor.data.synth.generate import generate_item

    config = config or DEFAULT_CONFIG
    items = []
    for index in range(n):
        item = generate_item(split, index, seed=seed, config=config, families=families)
        items.append(EvalItem(
            id=item.id, family=item.family, difficulty=item.difficulty, grader=item.grader,
            images=[item.image], turns=item.conversations(question_first)[:1], answers=[item.answer],
        ))
    return items


def _raw_fields(path: Path, wheres: set[str]) -> dict[str, dict]:
    """``where -> {"family", "difficulty", "answer"}`` of the rejected records that are JSON objects, so
    a skipped item still lands in its family and shows its reference answer."""
    from visor.data.llava_format import ROLE_MAP, _iter_raw

    out = {}
    for where, obj, _err in _iter_raw(path):
        if where not in wheres or not isinstance(obj, dict):
            continue
        fields = {k: obj[k] for k in ("family", "difficulty") if isinstance(obj.get(k), str)}
        turns = obj.get("conversations")
        for turn in turns if isinstance(turns, list) else []:
            if (isinstance(turn, dict) and isinstance(turn.get("from"), str) and ROLE_MAP.get(turn["from"]) == "assistant"
                    and isinstance(turn.get("value"), str)):
                fields["answer"] = turn["value"]
                break
        out[where] = fields
    return out


def llava_items(path: str | Path, image_root: str | Path | None = None, default_grader: str = "exact", *,
                unknown_grader: str = "skip", missing_image_tag: str = "prepend",
                limit: int | None = None) -> tuple[list[EvalItem], dict]:
    """Items of a LLaVA-format JSON/JSONL file, in file order, and the reader's report (a dict).

    Records the reader rejects are kept as failed items with its reason (module docstring);
    ``unknown_grader="error"`` (what ``visor eval`` uses) raises :class:`UnknownGraderError` naming every
    item with an unknown grader; the default ``"skip"`` keeps them as failed items (``unknown_grader``),
    so a periodic evaluation inside training reports them instead of stopping the run.
    ``limit``: the first ``limit`` records only (rejected ones included).
    """
    from visor.data.llava_format import LlavaDataset

    get_grader(default_grader)  # an unknown default is a usage error
    if unknown_grader not in ("error", "skip"):
        raise ValueError("unknown_grader must be 'error' or 'skip'")
    path = Path(path)
    dataset = LlavaDataset(path, image_root, default_grader=default_grader, missing_image_tag=missing_image_tag)
    warnings: dict[str, str] = {}
    entries: list = []  # LlavaRecord or Problem, in file order
    n_problems = 0

    def take_problems() -> None:
        nonlocal n_problems
        entries.extend(dataset.report.skipped[n_problems:])
        n_problems = len(dataset.report.skipped)

    for record in dataset:
        take_problems()
        entries.append(record)
        if limit is not None and len(entries) >= limit:
            break
    take_problems()
    if limit is not None:
        entries = entries[:limit]
    for problem in dataset.report.warnings:
        warnings[problem.where] = f"{problem.code}: {problem.message}"

    bad_graders = [p for p in entries if getattr(p, "code", None) == "unknown_grader"]
    if bad_graders and unknown_grader == "error":
        shown = "; ".join(str(p) for p in bad_graders[:5])
        more = f" (and {len(bad_graders) - 5} more)" if len(bad_graders) > 5 else ""
        raise UnknownGraderError(f"{len(bad_graders)} item(s) name an unknown grader: {shown}{more}. "
                                 f"Known graders: {', '.join(grader_names())}. Fix the data, or give items "
                                 f"without a 'grader' field a default with --grader")

    rejected = {e.where for e in entries if not hasattr(e, "conversations")}
    raw = _raw_fields(path, rejected) if rejected else {}
    items = []
    for entry in entries:
        if hasattr(entry, "conversations"):  # a LlavaRecord
            items.append(EvalItem(
                id=entry.id, family=entry.family or "all", difficulty=entry.difficulty or "", grader=entry.grader or default_grader,
                images=list(entry.images), turns=entry.prompt_turns(), answers=_references(entry),
                warning=warnings.get(entry.source),
            ))
        else:  # a Problem: the record could not be read; it still counts
            fields = raw.get(entry.where, {})
            items.append(EvalItem(
                id=entry.id or entry.where, family=fields.get("family", UNREADABLE_FAMILY),
                difficulty=fields.get("difficulty", ""), grader=default_grader, images=[], turns=[],
                answers=[fields.get("answer", "")],
                problem=str(entry), reason=entry.code,
            ))
    _fill_difficulties(items)
    report = dataset.report.to_dict()
    report["limit"] = limit
    return items, report


def _references(record) -> list[str]:
    """Reference answers: the record's ``answers`` list when it has one (VQA/DocVQA style, the grader
    takes the best match), else its first gpt turn."""
    answers = record.extra.get("answers")
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        return list(answers)
    return [record.answer()]


def _fill_difficulties(items: Sequence[EvalItem]) -> None:
    """Items without a difficulty take their family's (from the other items); else ``"all"``.
    A family under two difficulties is an error (it would sit in two means)."""
    known: dict[str, str] = {}
    for item in items:
        if item.difficulty:
            if known.setdefault(item.family, item.difficulty) != item.difficulty:
                raise ValueError(f"family {item.family!r} appears as both {known[item.family]!r} and "
                                 f"{item.difficulty!r} (item {item.id}); a family must have one difficulty")
    for item in items:
        if not item.difficulty:
            item.difficulty = known.get(item.family, "all")


# ---------------------------------------------------------------------- cost
def _reducer(generate_kwargs: dict | None):
    spec = (generate_kwargs or {}).get("reducer")
    if spec is None:
        return None
    from visor.compression import build_reducer

    return build_reducer(spec)


def item_cost(model, geometry, plan, config, reducer, image_sizes: list[tuple[int, int]], n_visual: int,
              n_text: int, tiled: bool = True) -> tuple[float, float | None, int]:
    """(LLM prefill FLOPs, vision encoder + projector FLOPs, visual tokens entering the LLM).

    ``tiled=False``: the item ran base-only (``visor.model.resolution``), one crop per image."""
    from visor.cost import count_prefill
    from visor.model.plan import LayerPlan
    from visor.model.vision import num_crops

    cfg = model.config
    tiled = len(image_sizes) == 1 and tiled
    crops = sum(num_crops(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, tiled) for size in image_sizes)
    per_layer, overhead, n_llm = None, 0, n_visual
    if reducer is not None and n_visual > 0:
        if reducer.stage == "pre_llm":
            from visor.compression.layout import ImageLayout

            n_llm = sum(reducer.kept_count(ImageLayout.from_config(cfg, size, tiled)) for size in image_sizes)
        else:
            per_layer = reducer.visual_tokens_per_layer(geometry.text.num_layers, n_visual)
        overhead = int(reducer.selection_flops(geometry, n_visual, n_text, crops))
    n_cost = n_llm
    if n_llm == 0:  # a text-only prompt: every layer runs on the text alone, whatever its kind
        plan, config, n_cost = LayerPlan(plan.num_layers, (), ()), (), 1  # (no visual token is ever read)
    cost = count_prefill(
        geometry, plan, config, n_cost, max(n_text, 1), visual_tokens_per_layer=per_layer,
        ca_kv_layout=getattr(cfg, "ca_kv_layout", "gqa"), n_crops=crops or None,
        compression_overhead_flops=overhead,
    )
    vision = (cost.vision_encoder or 0) + (cost.projector or 0) if crops else 0
    return float(cost.llm_total), float(vision), int(n_llm)


# ---------------------------------------------------------------------- running

def on_request_cost(model, geometry, config, reducer, image_sizes: list[tuple[int, int]], n_visual: int, n_text: int,
                    crops: int) -> tuple[float, float | None, int]:
    """:func:`item_cost` of a sample routed on request (``visor.routing.resolution``): the chosen
    configuration's prefill plus the routing pass on the base-only layout, and the vision tower on the
    ``crops`` it really encoded (``OnRequest.crops``)."""
    from visor.cost.flops import projector_flops, vision_encoder_flops
    from visor.routing.router import router_overhead_flops

    llm, vision, n_llm = item_cost(model, geometry, model.plan, config.active_sa, reducer, image_sizes, n_visual, n_text,
                                   tiled=config.resolution == "full")
    base_visual = sum(model.num_image_tokens(s, tiled=False) for s in image_sizes)
    llm += router_overhead_flops(model, base_visual, n_text)
    if crops and geometry.vision is not None:
        vision = float(vision_encoder_flops(geometry.vision, crops) + projector_flops(geometry.vision, crops))
    return llm, vision, n_llm

def _load_images(item: EvalItem) -> list:
    from visor.processing.processor import load_image

    return [load_image(im) if isinstance(im, (str, Path)) else im for im in item.images]


def end_token(tokenizer) -> int | None:
    """The id that ends an assistant turn: ``<|im_end|>`` where the vocabulary has it, else EOS."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(eos, int) and eos != tokenizer.unk_token_id:
        return eos
    return tokenizer.eos_token_id


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    image_processor,
    items: Sequence[EvalItem],
    *,
    active_sa=None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
    generate_kwargs: dict | None = None,
    config_for_item: Callable[[EvalItem], Any] | None = None,
    route: bool = False,
    budget: float = 0.0,
    resolution: str | None = None,
) -> EvalResult:
    """Generate an answer for every item (greedy) and grade it (module docstring).

    ``active_sa``: one configuration for every item (``None`` = all slots; a tuple of slots or ``"0+2"``).
    ``config_for_item``: a callable ``EvalItem -> configuration`` overriding it per item.
    ``generate_kwargs`` go to ``model.generate`` (e.g. ``reducer="pooling:0.5"``); a ``reducer`` is also
    taken into account by the FLOPs. The summary is :func:`visor.eval.graders.aggregate` plus
    ``mean_flops`` / ``mean_vision_flops`` / ``mean_visual_tokens`` over the items that ran.
    ``route``: the model's router picks each item's configuration (``budget`` biases it, see
    ``visor.routing.router``); the routing pass's own FLOPs are added to the item's LLM FLOPs.
    ``resolution``: ``"base"`` runs every item on its base view only (``visor.model.resolution``); a
    configuration may also name its resolution (``"base:0+1"``, a ``Configuration``). A router that picks the
    resolution runs ``visor.routing.resolution.generate_on_request``: tiles encoded only for the items it sends
    to full resolution, ``vision_flops``/``vision_crops`` counting the crops really encoded. The summary's
    ``mean_total_flops`` is end to end (vision + LLM).
    """
    from visor.cost import Geometry
    from visor.model.resolution import Configuration, parse_configuration

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = list(items)
    _fill_difficulties(items)
    for item in items:  # fail before any generation, not after the last batch
        get_grader(item.grader)
    model.eval()
    device = next(model.parameters()).device
    batcher = Batcher.for_model(model, tokenizer, image_processor)
    plan = model.plan
    geometry = Geometry.from_config(model.config)
    reducer = _reducer(generate_kwargs)
    eos = end_token(tokenizer)
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    results: dict[int, ItemResult] = {}

    def fail(i: int, reason: str, problem: str) -> None:
        item = items[i]
        results[i] = ItemResult(item.id, item.family, item.difficulty, item.grader, item.answers[0], None, None,
                                problem=problem, reason=reason, warning=item.warning)

    runnable = []
    for index, item in enumerate(items):
        if item.problem is not None:
            fail(index, item.reason or "other", item.problem)
        else:
            runnable.append(index)
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=not progress, leave=False)
    bar.update(len(items) - len(runnable))
    for start in range(0, len(runnable), batch_size):
        chunk, samples = [], []
        for i in runnable[start:start + batch_size]:
            item = items[i]
            try:
                images = _load_images(item)
            except ValueError as err:  # ImageLoadError: the file changed or vanished since it was read
                fail(i, "image_error", f"{item.id}: {err}")
                continue
            sample = Sample(images, item.turns)
            try:  # text only, cheap: a prompt the template cannot render fails alone, not its batch
                n_prompt = len(batcher.prompt_ids(sample))
            except ValueError as err:
                fail(i, "bad_prompt", f"{item.id}: cannot build the prompt: {err}")
                continue
            if max_positions and n_prompt + max_new_tokens > max_positions:
                fail(i, "prompt_too_long", f"{item.id}: {n_prompt} prompt tokens + {max_new_tokens} new tokens exceed "
                        f"max_position_embeddings={max_positions}")
                continue
            chunk.append(i)
            samples.append(sample)
        if chunk:
            extra = dict(generate_kwargs or {})
            on_request = None
            if (route or budget) and getattr(model.config, "router", None):
                from visor.routing.router import routes_resolution

                if routes_resolution(model):  # tiles encoded only for the items routed to full resolution
                    from visor.routing.resolution import generate_on_request

                    on_request = generate_on_request(model, batcher, samples, budget=budget, max_new_tokens=max_new_tokens,
                                                     eos_token_id=eos, pad_token_id=batcher.pad_token_id, **extra)
            chosen: list[Configuration] | None = None
            if on_request is not None:
                chosen = on_request.configurations
            elif not (route or budget):
                chosen = []
                for i in chunk:
                    c = parse_configuration(config_for_item(items[i]) if config_for_item else active_sa, plan)
                    chosen.append(Configuration(c.active_sa, resolution) if resolution else c)
            if on_request is not None:
                batch = to_device(on_request.batch, device)
            elif chosen is not None and any(c.resolution != "full" for c in chosen):
                batch = to_device(batcher.prompt_batch(samples, resolution=[c.resolution for c in chosen]), device)
            else:
                batch = to_device(batcher.prompt_batch(samples), device)
            if on_request is not None:
                configs = [c.active_sa for c in chosen]
            elif route or budget:
                with torch.no_grad():
                    features = model.encode_images(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"]) \
                        if "pixel_values" in batch else []
                configs = model.route(batch["input_ids"], batch["attention_mask"], image_features=features,
                                      batch_num_images=batch.get("batch_num_images"), budget=budget)
                extra["image_features"] = features
            else:
                configs = [c.active_sa for c in chosen]
            if on_request is not None:
                sequences = on_request.sequences
            else:
                sequences = model.generate(**batch, active_sa=configs, max_new_tokens=max_new_tokens,
                                           eos_token_id=eos, pad_token_id=batcher.pad_token_id, **extra)
            new = sequences[:, batch["input_ids"].shape[1]:].cpu()
            visual, text = count_tokens(batch, model.config.image_token_id)
            for row, i in enumerate(chunk):
                item = items[i]
                tokens = new[row].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos) + 1]
                prediction = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                score = float(get_grader(item.grader)(prediction, item.answers))
                similarity = edit_similarity(prediction, item.answers)
                sizes = [(im.height, im.width) for im in samples[row].images]
                res = chosen[row].resolution if chosen is not None else "full"
                if on_request is not None:  # routing pass on the base layout; the crops really encoded
                    crops = on_request.crops[row]
                    llm, vision, n_llm = on_request_cost(model, geometry, chosen[row], reducer, sizes, int(visual[row]),
                                                         int(text[row]), crops)
                else:
                    llm, vision, n_llm = item_cost(model, geometry, plan, configs[row], reducer, sizes,
                                                   int(visual[row]), int(text[row]), tiled=res == "full")
                    crops = _crops(model, sizes, res == "full")
                if on_request is None and (route or budget) and llm is not None:
                    from visor.routing.router import router_overhead_flops

                    llm += router_overhead_flops(model, int(visual[row]), int(text[row]))
                results[i] = ItemResult(
                    item.id, item.family, item.difficulty, item.grader, item.answers[0], prediction, score,
                    active_sa=format_slots(configs[row]), llm_flops=llm, vision_flops=vision,
                    visual_tokens=n_llm, text_tokens=int(text[row]), new_tokens=len(tokens), warning=item.warning,
                    resolution=res, vision_crops=crops, similarity=similarity,
                )
        bar.update(min(batch_size, len(runnable) - start))
    bar.close()
    ordered = [results[i] for i in range(len(items))]
    return EvalResult(ordered, summarize(ordered))


def summarize(results: Sequence[ItemResult]) -> dict:
    """Scores (:func:`visor.eval.graders.aggregate`) and cost means over the items that ran."""
    summary = aggregate([{"family": r.family, "difficulty": r.difficulty, "score": r.score} for r in results])
    # partial credit (edit similarity), a more sensitive signal than the scores early in training
    similar = aggregate([{"family": r.family, "difficulty": r.difficulty, "score": r.similarity} for r in results])
    summary["per_family_similarity"] = similar["per_family"]
    summary["easy_similarity_mean"], summary["hard_similarity_mean"] = similar["easy_mean"], similar["hard_mean"]
    ran = [r for r in results if r.llm_flops is not None]

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    summary["mean_flops"] = mean([r.llm_flops for r in ran])
    summary["mean_vision_flops"] = mean([r.vision_flops for r in ran])
    # end to end: vision tower + projector + LLM prefill (an item without an image has no vision line)
    summary["mean_total_flops"] = mean([r.llm_flops + (r.vision_flops or 0.0) for r in ran])
    crops = [getattr(r, "vision_crops", None) for r in ran]
    summary["mean_vision_crops"] = mean([c for c in crops if c is not None])
    resolutions = [r.resolution for r in ran if getattr(r, "resolution", None)]
    summary["resolution_share"] = {k: resolutions.count(k) / len(resolutions) for k in sorted(set(resolutions))}
    summary["mean_visual_tokens"] = mean([r.visual_tokens for r in ran])
    summary["mean_text_tokens"] = mean([r.text_tokens for r in ran])
    summary["n_warnings"] = sum(r.warning is not None for r in results)
    skipped: dict[str, int] = {}
    for r in results:
        if r.score is None:
            skipped[r.reason or "other"] = skipped.get(r.reason or "other", 0) + 1
    summary["skipped_by_reason"] = dict(sorted(skipped.items()))
    return summary


def _crops(model, sizes: list[tuple[int, int]], tiled: bool) -> int:
    """Crops the vision tower encodes for one item's images (tiles only for a sample's only image)."""
    from visor.model.vision import num_crops

    cfg = model.config
    tiled = tiled and len(sizes) == 1
    return sum(num_crops(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size, tiled) for s in sizes)


def _percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def format_table(summary: dict, title: str = "") -> str:
    """A small human table of per-family scores, the easy/hard means and the cost."""
    from visor.cost import format_flops

    lines = [title] if title else []
    similarity = summary.get("per_family_similarity") or {}
    lines.append(f"{'family':<14} {'score':>7} {'n':>5} {'edit sim':>9}")
    for family, score in summary["per_family"].items():
        lines.append(f"{family:<14} {_percent(score):>7} {summary['per_family_n'][family]:>5} "
                     f"{_percent(similarity.get(family)):>9}")
    for key in ("easy_mean", "hard_mean", "overall_mean"):
        sim = summary.get(key.replace("_mean", "_similarity_mean"))
        lines.append(f"{key:<14} {_percent(summary.get(key)):>7} {'':>5} {_percent(sim) if sim is not None else '':>9}")
    flops = summary.get("mean_flops")
    total = summary.get("mean_total_flops")
    lines.append(f"items {summary['n_items']}, skipped {summary['n_skipped']}, "
                 f"mean LLM prefill FLOPs {'-' if flops is None else format_flops(flops)}, "
                 f"end to end (vision + LLM) {'-' if total is None else format_flops(total)}")
    return "\n".join(lines)
