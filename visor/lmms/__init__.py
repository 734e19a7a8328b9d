"""lmms-eval plugin: the ``visor`` model.

Installed with the ``lmms`` extra (``pip install 'visor[lmms]'``), this package registers itself through
lmms-eval's entry-point group ``lmms_eval.models`` (see ``pyproject.toml``), so

    lmms-eval --model visor --model_args pretrained=DIR,active_sa=0+2 --tasks docvqa_val ...

evaluates a VISOR or plain LLaVA-OneVision checkpoint (``visor.lmms.model.Visor``). lmms-eval is imported
only when lmms-eval loads the plugin: nothing else in ``visor`` depends on it.
"""

from __future__ import annotations

MODEL_ID = "visor"
CLASS_PATH = "visor.lmms.model.Visor"


def manifests():
    """The entry-point payload lmms-eval (>= 0.7) reads: one ``ModelManifest`` for ``--model visor``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
