"""``visor serve``: an OpenAI-compatible chat-completions server over a VISOR or LLaVA-OV checkpoint.

- ``schemas``: the request models (OpenAPI-documented) and the OpenAI-style error body.
- ``inputs``: messages -> one :class:`visor.data.batch.Sample` (images from data URLs or allowed local
  files, never the network), validated before anything is queued.
- ``batching``: the dynamic-batching engine (a worker thread collecting requests for a short window,
  grouped by configuration and generation options, one ``model.generate`` per group).
- ``app``: the FastAPI application (``create_app``).

FastAPI/uvicorn are the ``serve`` extra (``pip install 'visor[serve]'``); nothing here is imported by
the rest of the package.
"""
