#!/usr/bin/env bash
# Build the lmms-eval test environment (.venv-lmms, or $VISOR_LMMS_VENV): visor (editable) with the
# pinned versions of constraints.txt, lmms-eval 0.7.3 installed WITHOUT its dependency set (which pulls
# torchvision and dozens of heavy packages that break the CPU torch build used here), and only what
# lmms-eval's model registry, task loading and simple_evaluate import. tests/test_lmms.py runs
# lmms-eval in this environment (and fails when it is missing). The README's install line and
# .ci/run call this script; it is idempotent (a second run only checks).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VISOR_LMMS_VENV:-.venv-lmms}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" -c constraints.txt -c constraints-lmms.txt -e .
"${PIP[@]}" --no-deps -c constraints-lmms.txt lmms-eval
"${PIP[@]}" -c constraints.txt -c constraints-lmms.txt loguru pytz accelerate sacrebleu evaluate tenacity datasets "filelock<4"
# the environment must import lmms-eval's evaluator, see our entry point, and have no torchvision
"$VENV/bin/python" - <<'PYCHECK'
import importlib.util
import sys

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup_lmms_env: torchvision is installed in this environment; it must not be (see the script header)")
from lmms_eval.evaluator import simple_evaluate  # noqa: F401
from lmms_eval.models import get_model_manifest

manifest = get_model_manifest("visor")
assert manifest.simple_class_path == "visor.lmms.model.Visor", manifest
print(f"setup_lmms_env: lmms-eval ready in {sys.prefix} (model 'visor' -> {manifest.simple_class_path})")
PYCHECK
