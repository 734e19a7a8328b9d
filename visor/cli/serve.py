"""``visor serve``: an OpenAI-compatible chat-completions server (FastAPI + uvicorn).

    visor serve --model DIR [--host 127.0.0.1 --port 8000] [--allowed-image-dir DIR ...]

``POST /v1/chat/completions`` (streamed or not; images as data URLs, or local paths inside an
``--allowed-image-dir``; never fetched from the network), ``GET /v1/models``, ``GET /health``, and the
OpenAPI schema at ``/openapi.json`` (``/docs`` to browse it). A request may carry a ``visor`` field:
``{"active_sa": "0+2" | [0, 2], "sa_count": K, "route": true, "budget": 0.5, "reduce": "pooling:2x"}``.
Concurrent requests are batched dynamically (``--max-batch``, ``--batch-wait-ms``). Details:
``visor/serve/app.py``. Needs the ``serve`` extra (``pip install 'visor[serve]'``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from visor.cli.common import DTYPES, add_dtype


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible chat-completions server with per-request VISOR configurations",
        description="Serve a VISOR or LLaVA-OneVision checkpoint over an OpenAI-compatible HTTP API "
                    "(POST /v1/chat/completions, GET /v1/models, GET /health, /openapi.json). A LLaVA-OV folder "
                    "runs as the original model (every layer self-attention).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (VISOR or LLaVA-OneVision)")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="model id clients send in 'model' (default: the folder's name; the path is accepted too)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--allowed-image-dir", action="append", default=[], metavar="DIR",
                        help="a folder whose images requests may name by local path or file:// URL (repeatable; "
                             "default: none, only data URLs)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests per generate call (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="T",
                        help="how long the batcher waits for more requests after the first (default 10)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting at most; beyond it the server answers 503 (default 256)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="P",
                        help="largest image accepted, width x height (default 16777216)")
    parser.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request at most (default 8)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, metavar="K",
                        help="longest prompt accepted, image tokens included (default: the model's context length)")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="T",
                        help="max_tokens when a request gives none (default 256)")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, metavar="T",
                        help="largest max_tokens a request may ask for (default 2048)")
    parser.add_argument("--max-request-mb", type=float, default=64.0, metavar="MB",
                        help="largest request body in MiB (default 64)")
    add_dtype(parser, default="fp32")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default info)")
    parser.set_defaults(func=run)


def limits_from_args(args: argparse.Namespace):
    from visor.serve.inputs import Limits

    folders = []
    for folder in args.allowed_image_dir:
        path = Path(os.path.realpath(folder))
        if not path.is_dir():
            raise SystemExit(f"visor serve: --allowed-image-dir {folder}: not a folder")
        folders.append(path)
    for name in ("max_batch", "max_queue", "max_image_pixels", "max_images", "max_tokens", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise SystemExit(f"visor serve: --{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise SystemExit("visor serve: --max-prompt-tokens must be >= 1")
    if args.batch_wait_ms < 0:
        raise SystemExit("visor serve: --batch-wait-ms must be >= 0")
    if args.max_tokens > args.max_tokens_limit:
        raise SystemExit("visor serve: --max-tokens is larger than --max-tokens-limit")
    return Limits(allowed_image_dirs=tuple(folders), max_image_pixels=args.max_image_pixels,
                  max_images=args.max_images, max_prompt_tokens=args.max_prompt_tokens,
                  max_tokens_default=args.max_tokens, max_tokens_limit=args.max_tokens_limit)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from visor.serve.app import build_app
    except ImportError as err:
        raise SystemExit(f"visor serve needs the 'serve' extra: pip install 'visor[serve]' ({err})") from None
    import torch

    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"visor serve: {args.model} is not a checkpoint folder (no config.json)")
    limits = limits_from_args(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    app = build_app(args.model, model_name=args.model_name, dtype=DTYPES[args.dtype], device=device, limits=limits,
                    max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                    max_request_bytes=int(args.max_request_mb * 1024 * 1024))
    settings = app.state.settings
    print(f"visor serve: model {settings.model_name!r} ({settings.model_kind}, {app.state.engine.model.plan.num_slots} "
          f"SA slot(s)) on http://{args.host}:{args.port} (device {device}; images from "
          f"{', '.join(str(d) for d in limits.allowed_image_dirs) or 'data URLs only'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
