"""The FastAPI application of ``visor serve``.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events, ending with ``data: [DONE]``,
or not), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (status and batching counters),
and FastAPI's ``/openapi.json`` and ``/docs``.

Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: request validation
(malformed JSON, wrong types, an invalid ``visor`` field) answers 400, an unknown model 404, a body over
``max_request_bytes`` 413, a full queue 503; the server keeps serving after each.

``usage`` carries OpenAI's ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` (the prompt counted
as the model sees it: image placeholders included) plus ``visual_tokens`` (visual tokens entering the
LLM, after a reducer) and ``llm_flops`` (LLM prefill FLOPs of the request from ``visor.cost``, as
``visor eval`` counts them). The response's extra ``visor`` object says which SA slots ran.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visor.serve.batching import BatchEngine, Job
from visor.serve.inputs import Limits, prepare
from visor.serve.schemas import ApiError, ChatCompletionRequest


@dataclass
class ServeSettings:
    model_name: str
    model_path: str = ""
    model_kind: str = "visor"
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 256
    max_request_bytes: int = 64 * 1024 * 1024


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_message(errors) -> tuple[str, str | None, str]:
    parts, param, code = [], None, "invalid_request"
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            code = "invalid_json"
            parts.append(f"malformed JSON body ({e.get('ctx', {}).get('error', e.get('msg'))})")
            continue
        if param is None and where:
            param = where
        if e.get("type") == "missing" and not where:
            parts.append("the request body must be a JSON object")
            continue
        if where.startswith("visor"):
            code = "invalid_visor_option"
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    if len(errors) > 5:
        parts.append(f"... {len(errors) - 5} more")
    return "; ".join(parts), param, code


def _usage(result: dict) -> dict:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        "visual_tokens": result["visual_tokens"],
        "llm_flops": result["llm_flops"],
    }


def _visor_info(result: dict) -> dict:
    return {k: result[k] for k in ("active_sa", "resolution", "route", "budget", "reduce", "vision_flops", "batch_size")}


def create_app(engine: BatchEngine, model, settings: ServeSettings, *, manage_engine: bool = True) -> FastAPI:
    """The application around a started-or-not :class:`BatchEngine` (started and stopped with the app
    when ``manage_engine``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await run_in_threadpool(engine.stop)

    app = FastAPI(title="visor serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for VISOR / LLaVA-OneVision checkpoints, with a "
                              "per-request 'visor' field (active_sa, sa_count, route, budget, reduce).")
    created = int(time.time())
    names = {settings.model_name, settings.model_path} - {""}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        message, param, code = _validation_message(err.errors())
        return _error_response(ApiError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return _error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal_error"))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > settings.max_request_bytes
            except ValueError:
                return _error_response(ApiError(400, "invalid Content-Length header", code="invalid_request"))
            if too_big:
                return _error_response(ApiError(413, f"request body of {length} bytes is larger than this server "
                                                     f"accepts ({settings.max_request_bytes})", code="request_too_large"))
        return await call_next(request)

    def model_card() -> dict:
        plan = model.plan
        return {
            "id": settings.model_name, "object": "model", "created": created, "owned_by": "visor",
            "visor": {"kind": settings.model_kind, "sa_slots": plan.num_slots,
                      "cross_attention_layers": list(plan.cross_attention_layers),
                      "self_attention_layers": list(plan.self_attention_layers),
                      "router": bool(getattr(model.config, "router", None))},
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "stats": engine.snapshot()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id not in names:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", responses={400: {"description": "OpenAI-style error body"}})
    async def chat_completions(body: ChatCompletionRequest):
        if body.model not in names:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        prepared = await run_in_threadpool(prepare, body, model, engine.batcher, settings.limits)
        loop = asyncio.get_running_loop()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not prepared.stream:
            job = Job(prepared, loop, future=loop.create_future())
            engine.submit(job)
            try:
                result = await job.future
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            return {
                "id": request_id, "object": "chat.completion", "created": now, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": _usage(result), "visor": _visor_info(result),
            }
        job = Job(prepared, loop, events=asyncio.Queue())
        engine.submit(job)  # a full queue answers 503 before the stream starts

        def chunk(delta: dict, finish: str | None = None) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": now,
                       "model": settings.model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if prepared.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            sent = ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await job.events.get()
                    if kind == "delta":
                        sent += value
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                        break
                    else:
                        rest = value["text"][len(sent):] if value["text"].startswith(sent) else ""
                        if rest:
                            yield chunk({"content": rest})
                        yield chunk({}, value["finish_reason"])
                        if prepared.include_usage:
                            payload = {"id": request_id, "object": "chat.completion.chunk", "created": now,
                                       "model": settings.model_name, "choices": [], "usage": _usage(value),
                                       "visor": _visor_info(value)}
                            yield f"data: {json.dumps(payload)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): stop generating for it
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.state.engine = engine
    app.state.settings = settings
    return app


def load_model(folder: str, dtype, device):
    """(model, processor, kind) for a checkpoint folder: LLaVA-OV as the original model, VISOR as saved."""
    from visor.cli.eval import load_for_eval
    from visor.processing.processor import VisorProcessor

    model, kind = load_for_eval(folder, dtype)
    model.to(device)
    return model, VisorProcessor.from_pretrained(folder), kind


def build_app(folder: str, *, model_name: str | None = None, dtype=None, device: str = "cpu",
              limits: Limits | None = None, max_batch: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 256,
              max_request_bytes: int = 64 * 1024 * 1024) -> FastAPI:
    """Load a checkpoint and build its application (what ``visor serve`` runs)."""
    import torch

    model, processor, kind = load_model(folder, dtype or torch.float32, device)
    engine = BatchEngine(model, processor.tokenizer, processor.image_processor, max_batch=max_batch,
                         batch_wait_ms=batch_wait_ms, max_queue=max_queue)
    settings = ServeSettings(model_name=model_name or Path(folder).resolve().name, model_path=str(folder),
                             model_kind=kind, limits=limits or Limits(), max_batch=max_batch,
                             batch_wait_ms=batch_wait_ms, max_queue=max_queue, max_request_bytes=max_request_bytes)
    return create_app(engine, model, settings)
