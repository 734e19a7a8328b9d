"""Wall-clock cost of VISOR next to the baseline at real LLaVA-OneVision geometry (``visor bench``).

``visor.bench.runner`` says what is measured and how; ``visor.bench.models`` what runs (geometry, image
rows, configurations, the synthetic decode cache); ``visor.bench.report`` what is written.
"""

from visor.bench.runner import run_bench

__all__ = ["run_bench"]
