"""Do the query-keyed families fail at reading, or at choosing what the question points to?

In ``doc`` ("what is the value of KEY?"), ``chart`` ("what is the value of bar LABEL?") and the training-only
``kind_color`` ("what colour is the KIND?") every image holds several candidate answers (each row's value, each bar's
value, each shape's colour) and the question's key picks one. For each predictions file (the per-item JSONL that
``visor eval --out`` and ``visor reproduce`` write) this regenerates every item's scene from its id and sorts the
answers of those families into:

- ``right``: the reference answer;
- ``other candidate``: the value of another row / bar / shape: read correctly, but from the wrong place;
- ``neither``: not a value of the image: a misreading.

Items the run skipped (their record carries a ``problem``) are left out.

Beside them, ``uniform pick`` is the accuracy of a reader that reads every candidate right and picks one of them at
random (candidates sharing the reference's value count as right). A model near that line reads and does not choose.

    python benchmarks/keyed_selection.py docs/reproduce-n2000/predictions/baseline.jsonl --image-size 128

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

KEYED_FAMILIES = ("doc", "chart", "kind_color")


def candidates(scene: dict) -> list[str]:
    """Every answer the image offers to its family's keyed question (one per row / bar / shape): the answer to the
    scene's own question and to each other question it answers (``families.other_queries``)."""
    from visor.data.synth.families import derive_answer, other_queries

    if scene["family"] not in KEYED_FAMILIES:
        raise ValueError(f"{scene['family']!r} is not a keyed family ({', '.join(KEYED_FAMILIES)})")
    return [derive_answer(scene)] + [derive_answer({**scene, "query": q}) for q in other_queries(scene)]


def parse_item_id(item_id: str) -> tuple[str, int, int]:
    """``(split, seed, index)`` of a procedural item id (``synth-SPLIT-SEED-INDEX``)."""
    parts = item_id.split("-")
    if len(parts) != 4 or parts[0] != "synth":
        raise ValueError(f"not a procedural item id: {item_id!r}")
    return parts[1], int(parts[2]), int(parts[3])


def classify(records: list[dict], config) -> dict[str, dict[str, float]]:
    """Per keyed family: item count and the shares of right / other-candidate / neither answers, and the
    uniform-pick accuracy. Raises if a regenerated item's answer differs from the record's (wrong canvas size)."""
    from visor.data.synth.generate import generate_item

    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        if record["family"] not in KEYED_FAMILIES or record.get("problem"):
            continue
        split, seed, index = parse_item_id(record["id"])
        # the item's family comes from the cycle position, its scene from (split, seed, index) alone
        item = generate_item(split, index, seed=seed, config=config, families=[record["family"]])
        if item.answer != record["answer"]:
            raise ValueError(f"{record['id']}: regenerated answer {item.answer!r} differs from the record's "
                             f"{record['answer']!r}; pass the canvas the items were made at (--image-size)")
        values = candidates(item.scene)
        row = counts[record["family"]]
        row["n"] += 1
        row["uniform_pick"] += sum(v == item.answer for v in values) / len(values)
        prediction = str(record["prediction"]).strip()
        if float(record["score"]) >= 1.0:
            row["right"] += 1
        elif prediction in values:
            row["other_candidate"] += 1
        else:
            row["neither"] += 1
    return {family: {"n": int(row["n"]), **{key: row[key] / row["n"] for key in
                                            ("right", "other_candidate", "neither", "uniform_pick")}}
            for family, row in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", nargs="+", help="per-item predictions JSONL files")
    parser.add_argument("--image-size", type=int, default=None,
                        help="synth canvas in px the items were made at (default: the benchmark's; 128 for the "
                             "shipped models)")
    args = parser.parse_args()
    from visor.data.synth.config import DEFAULT_CONFIG

    config = DEFAULT_CONFIG.with_image_size(args.image_size) if args.image_size else DEFAULT_CONFIG
    results = {}
    # the file name, or its folder too where names repeat (visor eval writes every run's as predictions.jsonl)
    names = [Path(p).name for p in args.predictions]
    labels = [n if names.count(n) == 1 else str(Path(*Path(p).parts[-2:])) for n, p in zip(names, args.predictions)]
    width = max(28, *(len(label) + 1 for label in labels))
    print(f"{'predictions':<{width}} {'family':<11} {'n':>5} {'right':>7} {'other cand.':>12} {'neither':>8} {'uniform pick':>13}")
    for path, label in zip(args.predictions, labels):
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        table = classify(records, config)
        results[path] = table
        for family in KEYED_FAMILIES:
            if family in table:
                row = table[family]
                print(f"{label:<{width}} {family:<11} {row['n']:>5} {100 * row['right']:>6.1f}% "
                      f"{100 * row['other_candidate']:>11.1f}% {100 * row['neither']:>7.1f}% {100 * row['uniform_pick']:>12.1f}%")
    print(json.dumps({"image_size": config.image_size, "results": results}))


if __name__ == "__main__":
    main()
