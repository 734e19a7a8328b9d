"""Seed scheme of the procedural benchmark: splits can never share a seed.

Every item has its own 64-bit integer seed built from three fields::

    item_seed = split_code << 56 | seed << 32 | index        (train = 1, val = 2, test = 3)

``seed`` (the user's ``--seed``, 0 <= seed < 2**24) and ``index`` (the item's position in the split,
0 <= index < 2**32) fill the low bits and the split name fills the top byte, so two different splits
differ in the top byte of every item seed: the three splits are disjoint *by construction* for every
choice of user seeds and sizes (no hashing, so no collision argument is needed). Each item is drawn
from ``numpy.random.default_rng(item_seed)`` alone, so item ``i`` does not depend on how many items
come before it, generation can be sharded across workers, and ``--n`` can grow without changing the
items already written.
"""

from __future__ import annotations

SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3}
SPLITS: tuple[str, ...] = tuple(SPLIT_CODES)

MAX_SEED = 1 << 24
MAX_INDEX = 1 << 32


def check_split(split: str) -> str:
    """Return ``split`` if it is one of ``train``, ``val``, ``test``; raise ``ValueError`` otherwise."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def item_seed(split: str, seed: int, index: int) -> int:
    """The integer seed of item ``index`` of ``split`` under user seed ``seed`` (see module doc)."""
    check_split(split)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}), got {seed}")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"index must be in [0, {MAX_INDEX}), got {index}")
    return (SPLIT_CODES[split] << 56) | (seed << 32) | index


def split_of_seed(value: int) -> str:
    """The split an item seed belongs to (inverse of the top byte of :func:`item_seed`)."""
    code = value >> 56
    for name, c in SPLIT_CODES.items():
        if c == code:
            return name
    raise ValueError(f"{value} is not an item seed of any split")
