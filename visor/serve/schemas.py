"""Request models of the OpenAI chat-completions API (the part ``visor serve`` implements), the ``visor``
extension field, and OpenAI-style errors.

Unknown request fields are ignored, as OpenAI-compatible servers usually do; fields we cannot honour
(``n > 1``, ``logprobs``, ``tools``, non-zero frequency/presence penalties) are refused with a 400 by
:mod:`visor.serve.inputs`, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if 400 <= status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str = Field(description="a data URL (data:image/png;base64,...) or a local file path / file:// URL inside "
                                 "one of the server's --allowed-image-dir folders; http(s) URLs are refused")
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class VisorOptions(BaseModel):
    """Per-request VISOR choices. ``active_sa`` and ``sa_count`` pick fixed SA slots; ``route`` (and
    ``budget``, which implies it) let the checkpoint's router pick per sample; ``reduce`` applies a
    visual-token reducer (``visor.compression``: ``"pooling:2x"``, ``"visionzip:0.25"``, ...)."""

    model_config = ConfigDict(extra="forbid")

    active_sa: str | list[StrictInt] | None = Field(
        None, description="SA slots joined by '+' ('0+2'), a list [0, 2], 'none' (cross-attention only) or 'all'")
    sa_count: StrictInt | None = Field(None, ge=0, description="switch on the first K SA slots in the plan's order")
    route: StrictBool | None = Field(None, description="let the checkpoint's router choose the SA slots")
    budget: float | None = Field(None, description="router cost bias LAMBDA (implies route): >0 cheaper, <0 richer")
    reduce: str | None = Field(None, description="visual-token reducer 'NAME[:AMOUNT]'")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Sampling happens only when ``temperature > 0`` (omitted or 0: greedy)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, description="extension: top-k sampling (0 = off)")
    repetition_penalty: float | None = Field(None, gt=0, description="extension: transformers-style repetition penalty")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    user: str | None = None
    visor: VisorOptions | None = None
