"""``visor reproduce``: the paper's comparison end to end at small scale (see ``visor.reproduce.pipeline``).

Modules: ``presets`` (what runs), ``stages`` (caching and resume), ``pipeline`` (training-side stages),
``methods`` (the table's rows and budget matching), ``evaluation`` (every method on the test split),
``projection`` (FLOPs at LLaVA-OV-0.5B), ``timing`` (measured prefill), ``report`` (table and results files),
``shipped`` (the checkpoints plain ``visor reproduce`` evaluates).
"""
