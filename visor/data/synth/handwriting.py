"""Real handwritten digits for the ``handwriting`` family: scikit-learn's bundled ``load_digits``.

The 1,797 scans (8x8, 17 grey levels, from the UCI optical-recognition set; they ship inside
scikit-learn, so nothing is downloaded) are split by *index* into contiguous, disjoint pools:
train = [0, 1258), val = [1258, 1527), test = [1527, 1797) (70/15/15). Every pool holds every digit
(the set cycles through 0-9), and no scan is ever drawn by two splits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from visor.data.synth.seeds import check_split

N_SCANS = 1797
SCAN_POOLS: dict[str, tuple[int, int]] = {"train": (0, 1258), "val": (1258, 1527), "test": (1527, 1797)}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float32) / 16.0  # ink in [0, 1]
    labels = np.asarray(data.target, dtype=np.int64)
    if images.shape != (N_SCANS, 8, 8):
        raise RuntimeError(f"unexpected load_digits shape {images.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def scan_ink(index: int) -> np.ndarray:
    """The 8x8 ink map (0 = paper, 1 = full ink) of scan ``index``."""
    return _digits()[0][index]


def scan_label(index: int) -> int:
    """The digit (0-9) that scan ``index`` shows, from the dataset's own labels."""
    return int(_digits()[1][index])


@lru_cache(maxsize=4)
def scans_by_digit(split: str) -> tuple[tuple[int, ...], ...]:
    """For ``split``, the scan indices of its pool grouped by digit: ``result[d]`` lists digit ``d``."""
    lo, hi = SCAN_POOLS[check_split(split)]
    labels = _digits()[1]
    return tuple(tuple(int(i) for i in range(lo, hi) if labels[i] == d) for d in range(10))


def split_of_scan(index: int) -> str:
    """The split whose pool holds scan ``index``."""
    for name, (lo, hi) in SCAN_POOLS.items():
        if lo <= index < hi:
            return name
    raise ValueError(f"scan index {index} out of range [0, {N_SCANS})")
