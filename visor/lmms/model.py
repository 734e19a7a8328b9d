"""``visor`` for lmms-eval: ``generate_until`` (batched, our generation, fixed SA slots / router / reducer)
and ``loglikelihood``, with the LLM prefill FLOPs of every sample recorded (``visor.cost``, as
``visor eval`` counts them).

Model arguments (``--model_args key=value,...``):

=================  =========================================================================
``pretrained``     checkpoint folder: a VISOR checkpoint runs as saved; a LLaVA-OneVision one as
                   the original model (every layer self-attention), as ``visor eval`` does
``active_sa``      SA slots joined by ``+`` (``0+2``), ``none`` (cross-attention only) or ``all``
``sa_count``       the first K SA slots instead
``route``          ``true``: the checkpoint's router picks the slots per sample; ``budget``
                   (a float) biases it (implies ``route``). A router that also picks the resolution
                   (``visor.routing.resolution``) reads the base view first and encodes the tiles only
                   for the samples it sends to full resolution, in both request kinds
``reduce``         a visual-token reducer ``NAME[:AMOUNT]`` (``pooling:2x``, ``visionzip:0.25``)
``batch_size``     prompts per ``generate`` / forward call (default 8; lmms-eval's ``--batch_size``)
``max_new_tokens`` default answer length when a task's ``generation_kwargs`` give none (32)
``dtype``          ``fp32`` (default), ``bf16`` or ``fp16``; ``device``: ``auto`` / ``cpu`` / ``cuda:0``
``flops_out``      a JSON file to write the FLOPs report to after each call (optional)
=================  =========================================================================

Prompts are built exactly as training and ``visor eval`` build them (:class:`visor.data.batch.Batcher`):
the task's context as a user turn, with one ``<image>`` tag per image prepended when the context has
none. ``generate_until`` decodes the answer up to the end-of-turn token, then cuts it at the first of the
task's ``until`` strings. ``loglikelihood`` scores the continuation's tokens after the generation prompt
and returns ``(negative log-likelihood summed over those tokens, whether greedy decoding would produce
them)``: lmms-eval (0.7.x) scores multiple choice with ``argmin`` (its own models return a loss there),
so the value is a loss, lower = likelier, not lm-eval's log-probability.

FLOPs: ``self.flops_records`` (one per answered request), ``flops_summary()`` (mean LLM prefill FLOPs per
sample, overall and per task) logged after every call and written to ``flops_out``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from loguru import logger as eval_logger
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

try:  # lmms-eval >= 0.7: answers may carry token counts
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # pragma: no cover
    GenerationResult = TokenCounts = None

from visor.data.batch import Batcher, Sample, count_tokens
from visor.data.llava_format import IMAGE_TAG, collate_tokens

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _slots_arg(value) -> str | None:
    """lmms-eval parses ``active_sa=0`` as the int 0 and ``0+2`` as a string: both back to the slot string."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class Visor(lmms):
    """A VISOR / LLaVA-OneVision checkpoint as an lmms-eval model (module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, active_sa=None, sa_count: int | None = None, route: bool = False,
                 budget: float | None = None, reduce: str | None = None, batch_size: int | str = 8,
                 max_new_tokens: int = 32, dtype: str = "fp32", device: str = "auto", flops_out: str | None = None,
                 **unused: Any) -> None:
        super().__init__()
        from visor.cli.eval import load_for_eval
        from visor.cost import Geometry
        from visor.eval.harness import end_token
        from visor.processing.processor import VisorProcessor

        if unused:
            eval_logger.warning(f"visor: ignoring unknown model_args {sorted(unused)}")
        if dtype not in _DTYPES:
            raise ValueError(f"visor: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if device in (None, "auto", ""):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        try:
            model, self.model_kind = load_for_eval(str(pretrained), _DTYPES[dtype])
        except SystemExit as err:  # load_for_eval's usage errors
            raise ValueError(str(err).replace("visor eval:", "visor:")) from None
        self.model = model.to(self._device).eval()
        processor = VisorProcessor.from_pretrained(str(pretrained))
        self.tokenizer = processor.tokenizer
        self.batcher = Batcher.for_model(self.model, self.tokenizer, processor.image_processor)
        self.geometry = Geometry.from_config(self.model.config)
        self.eos_token_id = end_token(self.tokenizer)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"visor: batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.flops_out = flops_out
        self.flops_records: list[dict] = []

        plan = self.model.plan
        active_sa = _slots_arg(active_sa)
        self.route = bool(route) or budget is not None
        self.budget = None if budget is None else float(budget)
        if self.route:
            if active_sa is not None or sa_count is not None:
                raise ValueError("visor: route/budget let the router choose the SA slots; do not give active_sa or sa_count")
            if not getattr(self.model.config, "router", None):
                raise ValueError("visor: route/budget: this checkpoint has no router (config.router is unset)")
            if not callable(getattr(self.model, "route", None)):
                raise ValueError("visor: route/budget: this version of visor cannot route")
            self.config = None
        elif sa_count is not None:
            if active_sa is not None:
                raise ValueError("visor: give active_sa or sa_count, not both")
            self.config = plan.first_slots(int(sa_count))
        else:
            self.config = plan.resolve_active(active_sa)
        from visor.routing.router import routes_resolution

        self.on_request = self.route and routes_resolution(self.model)
        self.reduce = reduce
        self.reducer = None
        if reduce is not None:
            from visor.compression import build_reducer

            self.reducer = build_reducer(str(reduce))

    # ------------------------------------------------------------------ lmms-eval plumbing
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ inputs
    def _sample(self, context: str, doc_to_visual, doc_id, task, split) -> Sample:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = []
        for visual in _flatten(visuals):
            if visual is None:
                continue
            if isinstance(visual, (str, Path)):
                from visor.processing.processor import load_image

                if Path(visual).suffix.lower() in (".mp4", ".avi", ".mov", ".webm", ".mkv"):
                    raise ValueError(f"visor: video inputs are not supported ({visual})")
                visual = load_image(visual)
            if not hasattr(visual, "convert"):
                raise ValueError(f"visor: unsupported visual of type {type(visual).__name__} in {task}/{doc_id}")
            images.append(visual.convert("RGB"))
        tags = context.count(IMAGE_TAG)
        if tags == 0 and images:
            context = (IMAGE_TAG + "\n") * len(images) + context
        elif tags != len(images):
            raise ValueError(f"visor: {task}/{doc_id}: the context has {tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
        return Sample(images, [{"from": "human", "value": context}])

    def _inputs(self, batch: dict) -> dict:
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _configs(self, inputs: dict) -> tuple[list[tuple[int, ...]], list | None]:
        """Per-row SA slots (the router's choice when routing) and the encoded images (when routed)."""
        batch = inputs["input_ids"].shape[0]
        if not self.route:
            return [self.config] * batch, None
        features = self.model.encode_images(inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"]) \
            if "pixel_values" in inputs else []
        configs = self.model.route(inputs["input_ids"], inputs["attention_mask"], image_features=features,
                                   batch_num_images=inputs.get("batch_num_images"), budget=self.budget or 0.0)
        return [tuple(c) for c in configs], features

    def _record(self, task, doc_id, config, samples_row: Sample, n_visual: int, n_text: int, kind: str,
                crops: int | None = None) -> dict:
        """One request's cost; ``config`` is a ``Configuration`` and ``crops`` the crops encoded when routed on
        request (``visor.routing.resolution``), else SA slots."""
        from visor.eval.harness import item_cost, on_request_cost
        from visor.model.plan import format_slots

        sizes = [(im.height, im.width) for im in samples_row.images]
        resolution = "full"
        if crops is not None:  # routed on request: routing pass on the base layout, the crops really encoded
            resolution = config.resolution
            llm, vision, n_llm = on_request_cost(self.model, self.geometry, config, self.reducer, sizes, n_visual,
                                                 n_text, crops)
            config = config.active_sa
        else:
            llm, vision, n_llm = item_cost(self.model, self.geometry, self.model.plan, config, self.reducer, sizes,
                                           n_visual, n_text)
        if self.route and crops is None:
            try:
                from visor.routing.router import router_overhead_flops

                llm += float(router_overhead_flops(self.model, n_visual, n_text))
            except ImportError:
                pass
        record = {"task": task, "doc_id": doc_id, "request": kind, "active_sa": format_slots(config),
                  "resolution": resolution, "llm_flops": llm, "vision_flops": vision, "visual_tokens": n_llm, "text_tokens": n_text}
        self.flops_records.append(record)
        return record

    # ------------------------------------------------------------------ FLOPs report
    def flops_summary(self) -> dict:
        """Mean LLM prefill FLOPs per sample (each distinct task/doc once), overall and per task."""
        per_doc: dict[tuple, float] = {}
        for r in self.flops_records:
            per_doc.setdefault((r["task"], r["doc_id"], r["request"]), r["llm_flops"])
        by_task: dict[str, list[float]] = defaultdict(list)
        for (task, _doc, _kind), flops in per_doc.items():
            by_task[task].append(flops)
        values = list(per_doc.values())
        configs: dict[str, int] = defaultdict(int)
        for r in self.flops_records:
            configs[r["active_sa"]] += 1
        return {
            "mean_llm_flops": sum(values) / len(values) if values else None,
            "n_samples": len(values),
            "per_task": {t: {"mean_llm_flops": sum(v) / len(v), "n_samples": len(v)} for t, v in sorted(by_task.items())},
            "active_sa_counts": dict(sorted(configs.items())),
            "model_kind": self.model_kind, "reduce": self.reduce, "route": self.route, "budget": self.budget,
        }

    def _report(self) -> None:
        summary = self.flops_summary()
        if summary["mean_llm_flops"] is not None:
            eval_logger.info(f"visor: mean LLM prefill FLOPs per sample {summary['mean_llm_flops']:.4g} "
                             f"over {summary['n_samples']} sample(s)")
        if self.flops_out:
            path = Path(self.flops_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"summary": summary, "samples": self.flops_records}, indent=1, default=str))

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            gen_kwargs = request.args[1] or {}
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start:start + self.batch_size_per_gpu]
                for i, out in zip(chunk, self._generate_chunk([requests[i] for i in chunk], dict(gen_kwargs))):
                    results[i] = out
        self._report()
        return results

    @torch.no_grad()
    def _generate_chunk(self, chunk: list[Instance], gen_kwargs: dict) -> list:
        until = gen_kwargs.pop("until", None)
        until = [] if until is None else ([until] if isinstance(until, str) else list(until))
        max_new = int(gen_kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        gen_kwargs.pop("do_sample", None)  # lmms-eval tasks sample iff temperature > 0
        do_sample = temperature > 0
        top_p = gen_kwargs.pop("top_p", None)
        top_k = gen_kwargs.pop("top_k", None)
        num_beams = gen_kwargs.pop("num_beams", 1) or 1
        if int(num_beams) > 1:
            eval_logger.warning("visor: num_beams > 1 is not supported; decoding greedily")
        samples, metas = [], []
        for request in chunk:
            context, _kwargs, doc_to_visual, doc_id, task, split = request.args
            samples.append(self._sample(context, doc_to_visual, doc_id, task, split))
            metas.append((task, doc_id))
        routed = None
        if self.on_request:
            from visor.routing.resolution import route_and_encode

            routed = route_and_encode(self.model, self.batcher, samples, budget=self.budget or 0.0, reducer=self.reducer)
            batch = routed.batch
            inputs = self._inputs({**batch, **routed.image_kwargs})
            configs, features = [c.active_sa for c in routed.configurations], None
        else:
            batch = self.batcher.prompt_batch(samples)
            inputs = self._inputs(batch)
            configs, features = self._configs(inputs)
        kwargs: dict[str, Any] = dict(active_sa=configs, max_new_tokens=max_new, do_sample=do_sample,
                                      temperature=temperature if do_sample else 1.0,
                                      top_p=float(top_p) if (do_sample and top_p is not None) else None,
                                      top_k=int(top_k) if (do_sample and top_k is not None) else None,
                                      eos_token_id=self.eos_token_id, pad_token_id=self.batcher.pad_token_id)
        stops = [s for s in until if s]
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        if features is not None:
            kwargs["image_features"] = features
        if self.reducer is not None:
            kwargs["reducer"] = self.reducer
        sequences = self.model.generate(**inputs, **kwargs)
        new = sequences[:, batch["input_ids"].shape[1]:].cpu()
        visual, text = count_tokens(batch, self.model.config.image_token_id)
        outputs = []
        for row, (task, doc_id) in enumerate(metas):
            tokens = new[row].tolist()
            if self.eos_token_id is not None and self.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.eos_token_id) + 1]
            answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in stops:
                answer = answer.split(stop)[0]
            answer = answer.strip()
            if routed is not None:
                self._record(task, doc_id, routed.configurations[row], samples[row], int(visual[row]), int(text[row]),
                             "generate_until", crops=routed.crops[row])
            else:
                self._record(task, doc_id, configs[row], samples[row], int(visual[row]), int(text[row]), "generate_until")
            if GenerationResult is not None:
                outputs.append(GenerationResult(answer, TokenCounts(input_tokens=int(batch["attention_mask"][row].sum()),
                                                                    output_tokens=len(tokens))))
            else:
                outputs.append(answer)
        return outputs

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Instance]) -> list:
        results: list = [None] * len(requests)
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = list(range(start, min(start + self.batch_size_per_gpu, len(requests))))
            for i, out in zip(chunk, self._loglikelihood_chunk([requests[i] for i in chunk])):
                results[i] = out
        self._report()
        return results

    @torch.no_grad()
    def _loglikelihood_chunk(self, chunk: list[Instance]) -> list:
        samples, conts, metas = [], [], []
        for request in chunk:
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            continuation = str(continuation)
            sample = self._sample(context, doc_to_visual, doc_id, task, split)
            cont = self.tok_encode(continuation)
            if not cont:
                raise ValueError(f"visor: {task}/{doc_id}: empty continuation")
            samples.append(sample)
            conts.append(cont)
            metas.append((task, doc_id))
        routed = None
        if self.on_request:  # route on the base view; score each sample at the resolution it was given
            from visor.routing.resolution import route_and_encode

            routed = route_and_encode(self.model, self.batcher, samples, budget=self.budget or 0.0, reducer=self.reducer)
            resolutions = [c.resolution for c in routed.configurations]
        else:
            resolutions = [None] * len(samples)
        prompts = [self.batcher.prompt_ids(s, r) for s, r in zip(samples, resolutions)]
        rows = [p + c for p, c in zip(prompts, conts)]
        n_cont = [len(c) for c in conts]
        batch = collate_tokens([(r, [-100] * len(r)) for r in rows], self.batcher.pad_token_id, padding_side="left")
        batch.pop("labels")
        extra: dict[str, Any] = {}
        if routed is not None:
            for key in ("batch_num_images", "image_tiled"):
                if key in routed.batch:
                    batch[key] = routed.batch[key]
            batch.update(routed.image_kwargs)
            configs = [c.active_sa for c in routed.configurations]
            inputs = self._inputs(batch)
        else:
            batch.update(self.batcher._pixels(samples))
            inputs = self._inputs(batch)
            configs, features = self._configs(inputs)
            if features is not None:
                extra["image_features"] = features
        keep = max(n_cont) + 1  # the last prompt token predicts the first continuation token
        if self.reducer is not None:
            extra["reducer"] = self.reducer
        out = self.model(**inputs, active_sa=configs, logits_to_keep=keep, **extra)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        ids = batch["input_ids"]
        visual, text = count_tokens(batch, self.model.config.image_token_id)
        answers = []
        width = ids.shape[1]
        text_index = out.text_index.cpu()  # input position of every logits slot (the text stream)
        for row, ((task, doc_id), n_prompt, n) in enumerate(zip(metas, map(len, prompts), n_cont)):
            target = ids[row, -n:]
            slot_of = {int(p): k for k, p in enumerate(text_index[row].tolist()) if p >= 0}
            wanted = range(width - n - 1, width - 1)  # input positions predicting the continuation
            if any(p not in slot_of for p in wanted):
                raise RuntimeError(f"visor: {task}/{doc_id}: continuation positions missing from the text logits")
            scores = logprobs[row, [slot_of[p] for p in wanted]]
            nll = -float(scores.gather(-1, target[:, None]).sum())
            greedy = bool((scores.argmax(-1) == target).all())
            answers.append(_loglikelihood_output((nll, greedy)))
            # FLOPs of the prompt the model was asked about (the continuation is scored, not generated)
            if routed is not None:
                self._record(task, doc_id, routed.configurations[row], samples[row], int(visual[row]),
                             n_prompt - int(visual[row]), "loglikelihood", crops=routed.crops[row])
            else:
                self._record(task, doc_id, configs[row], samples[row], int(visual[row]), n_prompt - int(visual[row]),
                             "loglikelihood")
        return answers

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("visor: multi-round generation is not supported")


def _loglikelihood_output(pair: tuple[float, bool]):
    """``(logprob, is_greedy)`` in a form the installed lmms-eval keeps intact.

    lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which
    turns anything but text into ``str(output)``, so a plain tuple reaches ``process_results`` as the
    string ``"(-1.5, False)"`` and multiple-choice scoring fails. Its ``GenerationResult`` is returned
    as ``.text`` unchanged, so the tuple travels inside one there; where unwrapping keeps tuples, the
    tuple is returned as is.
    """
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # pragma: no cover (older lmms-eval: tuples go through untouched)
        return pair
    if GenerationResult is None or unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out
