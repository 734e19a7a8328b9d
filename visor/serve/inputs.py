"""From a validated :class:`ChatCompletionRequest` to what the engine runs, or an :class:`ApiError`.

Everything that can be wrong with a request is found here, before it is queued: an unknown model name,
options we cannot honour, an invalid ``visor`` field, an image that is missing, undecodable, too large,
outside the allowed folders or on the network, a prompt the chat template cannot render, too many tokens.

Images: ``data:image/...;base64,...`` URLs, or local paths (``/abs/path.png`` or ``file:///abs/path.png``)
that resolve (symlinks followed) inside one of ``allowed_image_dirs``. Nothing is ever fetched from
the network: ``http(s)://`` and any other scheme are refused.

Prompts are built exactly as training and ``visor eval`` build them (:class:`visor.data.batch.Batcher`):
each message becomes a chat turn whose image parts become ``<image>\\n`` tags in order.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from visor.data.batch import Sample
from visor.data.llava_format import IMAGE_TAG
from visor.serve.schemas import ApiError, ChatCompletionRequest

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass
class Limits:
    """What the server accepts (``visor serve`` flags)."""

    allowed_image_dirs: tuple[Path, ...] = ()
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 32 * 1024 * 1024
    max_images: int = 8
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_tokens_default: int = 256
    max_tokens_limit: int = 2048


@dataclass
class GenSpec:
    """How a request is generated. ``key()`` is what must match for two requests to share a batch."""

    config: tuple[int, ...] | None  # fixed SA slots; None when routed
    route: bool = False
    budget: float | None = None
    reduce: str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def key(self) -> tuple:
        return (self.config, self.route, self.budget, self.reduce, self.do_sample, self.temperature, self.top_p,
                self.top_k, self.repetition_penalty, self.stop, self.seed)


@dataclass
class Prepared:
    """A request ready to queue."""

    sample: Sample
    prompt_tokens: int
    max_new_tokens: int
    spec: GenSpec
    stream: bool = False
    include_usage: bool = False
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


# ---------------------------------------------------------------------- images
def _open_image(data: bytes, what: str, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: checked before decoding a pixel
            if width * height > limits.max_image_pixels:
                raise ApiError(400, f"{what}: {width}x{height} = {width * height} pixels is larger than this server "
                                    f"accepts ({limits.max_image_pixels} pixels)", code="image_too_large")
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise ApiError(400, f"{what}: image too large ({err})", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, f"{what}: cannot decode the image ({err})", code="invalid_image") from None


def load_request_image(url: str, limits: Limits, param: str) -> Image.Image:
    """A PIL RGB image for one ``image_url``; :class:`ApiError` (400) for anything not allowed."""
    url = url.strip()
    what = f"image {param}"
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group("b64"):
            raise ApiError(400, f"{what}: a data URL must be 'data:image/<type>;base64,<data>'", param=param,
                           code="invalid_image_url")
        mime = match.group("mime")
        if mime and not mime.startswith("image/"):
            raise ApiError(400, f"{what}: data URL of type {mime!r} is not an image", param=param, code="invalid_image_url")
        payload = match.group("data")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(400, f"{what}: the encoded image is larger than {limits.max_image_bytes} bytes", param=param,
                           code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"{what}: invalid base64 data ({err})", param=param, code="invalid_image_url") from None
        try:
            return _open_image(data, what, limits)
        except ApiError as err:
            err.param = param
            raise
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp", "ftps", "ws", "wss"):
        raise ApiError(400, f"{what}: this server never fetches images from the network ({scheme}:// URL); send the "
                            f"image as a data URL (data:image/png;base64,...)", param=param, code="network_image_url")
    if scheme == "file":
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{what}: file URL on another host ({parsed.netloc!r}) is not allowed", param=param,
                           code="image_path_not_allowed")
        path_text = unquote(parsed.path)
    elif scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise ApiError(400, f"{what}: unsupported URL scheme {scheme!r}; use a data URL or a local path", param=param,
                       code="invalid_image_url")
    else:
        path_text = url
    if not limits.allowed_image_dirs:
        raise ApiError(400, f"{what}: this server reads no local image files (start it with --allowed-image-dir DIR); "
                            f"send the image as a data URL", param=param, code="image_path_not_allowed")
    path = Path(path_text)
    if not path.is_absolute():
        raise ApiError(400, f"{what}: a local image path must be absolute, got {path_text!r}", param=param,
                       code="image_path_not_allowed")
    resolved = Path(os.path.realpath(path))
    if not any(resolved == d or d in resolved.parents for d in limits.allowed_image_dirs):
        raise ApiError(400, f"{what}: {path_text!r} is outside the folders this server may read", param=param,
                       code="image_path_not_allowed")
    if not resolved.is_file():
        raise ApiError(400, f"{what}: image file not found: {path_text!r}", param=param, code="image_not_found")
    size = resolved.stat().st_size
    if size > limits.max_image_bytes:
        raise ApiError(400, f"{what}: the file is larger than {limits.max_image_bytes} bytes", param=param,
                       code="image_too_large")
    try:
        data = resolved.read_bytes()
    except OSError as err:
        raise ApiError(400, f"{what}: cannot read {path_text!r} ({err.strerror})", param=param, code="image_not_found") from None
    try:
        return _open_image(data, what, limits)
    except ApiError as err:
        err.param = param
        raise


# ---------------------------------------------------------------------- messages
def messages_to_sample(request: ChatCompletionRequest, limits: Limits) -> Sample:
    """Chat messages -> turns with ``<image>`` tags + the decoded images, in order."""
    turns, images = [], []
    for m, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            raise ApiError(400, f"messages[{m}] has no content", param=f"messages.{m}.content", code="invalid_value")
        parts = [content] if isinstance(content, str) else content
        text = ""
        for p, part in enumerate(parts):
            param = f"messages.{m}.content" if isinstance(content, str) else f"messages.{m}.content.{p}"
            if isinstance(part, str) or part.type == "text":
                piece = part if isinstance(part, str) else part.text
                if piece is None:
                    raise ApiError(400, f"{param}: a text part needs 'text'", param=param, code="invalid_value")
                if IMAGE_TAG in piece:
                    raise ApiError(400, f"{param}: the text may not contain {IMAGE_TAG!r}, the model's image "
                                        f"placeholder; send images as image_url parts", param=param, code="invalid_value")
                text += piece
            else:  # image_url
                if role != "user":
                    raise ApiError(400, f"{param}: images are accepted in user messages only", param=param,
                                   code="invalid_value")
                ref = part.image_url
                url = ref if isinstance(ref, str) else (ref.url if ref is not None else None)
                if not url:
                    raise ApiError(400, f"{param}: an image_url part needs image_url.url", param=param,
                                   code="invalid_value")
                if len(images) >= limits.max_images:
                    raise ApiError(400, f"too many images: this server accepts at most {limits.max_images} per request",
                                   param=param, code="too_many_images")
                images.append(load_request_image(url, limits, param))
                text += IMAGE_TAG + "\n"
        turns.append({"role": role, "content": text})
    return Sample(images, turns)


def _unsupported(request: ChatCompletionRequest) -> None:
    if request.n is not None and request.n != 1:
        raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n", code="unsupported_value")
    if request.logprobs or request.top_logprobs:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_value")
    if request.tools:
        raise ApiError(400, "tools are not supported by this server", param="tools", code="unsupported_value")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(request, name)
        if value not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported; use the 'repetition_penalty' extension field", param=name,
                           code="unsupported_value")


def generation_spec(request: ChatCompletionRequest, model, generate_params) -> GenSpec:
    """The :class:`GenSpec` of a request: its ``visor`` choices checked against the checkpoint."""
    opts = request.visor
    plan = model.plan
    config: tuple[int, ...] | None = plan.all_slots
    route, budget, reduce = False, None, None
    if opts is not None:
        if opts.active_sa is not None and opts.sa_count is not None:
            raise ApiError(400, "visor.active_sa and visor.sa_count are exclusive: give one", param="visor.active_sa",
                           code="invalid_visor_option")
        wants_route = bool(opts.route) or opts.budget is not None
        if wants_route and (opts.active_sa is not None or opts.sa_count is not None):
            raise ApiError(400, "visor.route/budget let the router choose the SA slots: do not give active_sa or "
                                "sa_count with them", param="visor.route", code="invalid_visor_option")
        if opts.budget is not None and opts.route is False:
            raise ApiError(400, "visor.budget biases the router: it needs route (omit route or set it true)",
                           param="visor.budget", code="invalid_visor_option")
        try:
            if opts.sa_count is not None:
                config = plan.first_slots(opts.sa_count)
            elif opts.active_sa is not None:
                config = plan.resolve_active(opts.active_sa)
        except ValueError as err:
            param = "visor.sa_count" if opts.sa_count is not None else "visor.active_sa"
            raise ApiError(400, f"{param}: {err}", param=param, code="invalid_visor_option") from None
        if wants_route:
            if not getattr(model.config, "router", None):
                raise ApiError(400, "visor.route/budget: this model has no router (its config has no 'router'); "
                                    "choose active_sa or sa_count instead", param="visor.route", code="no_router")
            if "route" not in generate_params and not callable(getattr(model, "route", None)):
                raise ApiError(400, "visor.route: this version's generation cannot route yet", param="visor.route",
                               code="no_router")
            if opts.budget is not None and "budget" not in generate_params:
                raise ApiError(400, "visor.budget: this version's generation has no budget knob yet",
                               param="visor.budget", code="no_router")
            route, budget, config = True, opts.budget, None
        if opts.reduce is not None:
            if "reducer" not in generate_params:
                raise ApiError(400, "visor.reduce: this version has no visual-token reducers", param="visor.reduce",
                               code="invalid_visor_option")
            from visor.compression import build_reducer

            try:
                build_reducer(opts.reduce)
            except (ValueError, TypeError, KeyError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise ApiError(400, f"visor.reduce {opts.reduce!r}: {message}", param="visor.reduce",
                               code="invalid_visor_option") from None
            reduce = opts.reduce
    temperature = request.temperature
    do_sample = temperature is not None and temperature > 0
    stop = request.stop
    stops = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
    return GenSpec(
        config=config, route=route, budget=budget, reduce=reduce, do_sample=do_sample,
        temperature=float(temperature) if do_sample else 1.0,
        top_p=request.top_p if do_sample else None, top_k=request.top_k if do_sample else None,
        repetition_penalty=request.repetition_penalty, stop=stops,
        seed=request.seed if do_sample else None,
    )


def prepare(request: ChatCompletionRequest, model, batcher, limits: Limits) -> Prepared:
    """Validate a request completely and turn it into a :class:`Prepared` (or raise :class:`ApiError`)."""
    from visor.model.generation import generate

    _unsupported(request)
    spec = generation_spec(request, model, inspect.signature(generate).parameters)
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens",
                       code="invalid_value")
    asked = request.max_completion_tokens or request.max_tokens
    max_new = asked or min(limits.max_tokens_default, limits.max_tokens_limit)
    if max_new > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_new} is more than this server generates per request "
                            f"({limits.max_tokens_limit})", param="max_tokens", code="invalid_value")
    sample = messages_to_sample(request, limits)
    try:
        n_prompt = len(batcher.prompt_ids(sample))
    except ValueError as err:
        raise ApiError(400, f"cannot build the prompt from these messages: {err}", param="messages",
                       code="invalid_value") from None
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    limit = limits.max_prompt_tokens if limits.max_prompt_tokens is not None else context
    if limit is not None and n_prompt > limit:
        raise ApiError(400, f"the prompt is {n_prompt} tokens (images included); this server accepts at most {limit}",
                       param="messages", code="context_length_exceeded")
    if context is not None and asked is None:  # the default never overflows the context by itself
        max_new = max(1, min(max_new, context - n_prompt))
    if context is not None and n_prompt + max_new > context:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_new}) exceed the model's context length "
                            f"({context})", param="max_tokens", code="context_length_exceeded")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Prepared(sample, n_prompt, int(max_new), spec, stream=request.stream, include_usage=include_usage,
                    image_sizes=[(im.height, im.width) for im in sample.images])
