"""``visor route label | relabel | train | report``: pseudo-labels, router training, router vs fixed configurations."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from visor.cli.common import add_image_size, print_json_line, synth_config_for


def _data_args(parser: argparse.ArgumentParser, split: str, n: int) -> None:
    parser.add_argument("--data", default="synth", help="'synth' (procedural benchmark) or a LLaVA-format JSON/JSONL file")
    parser.add_argument("--image-root", default=None, help="image folder for --data files")
    parser.add_argument("--split", default=split, choices=["train", "val", "test"], help=f"procedural split (default {split})")
    parser.add_argument("--n", type=int, default=n, help=f"items (default {n})")
    parser.add_argument("--seed", type=int, default=0, help="procedural dataset seed (default 0)")
    add_image_size(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="bf16 autocast or fp32 (default auto: bf16 where the CPU has AMX, see visor.precision)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("route", help="router: pseudo-labels, training, report",
                                   description="Per-sample configuration routing (see visor/routing/).")
    verbs = parser.add_subparsers(dest="route_verb", metavar="STEP")
    verbs.required = True

    label = verbs.add_parser("label", help="run every viable configuration on a training subset and label each sample",
                             description="Label each sample with the cheapest viable configuration that keeps >= THRESHOLD of "
                             "the maximal configuration's score. Writes JSONL (labels + every per-configuration score).")
    label.add_argument("--model", required=True, help="universal VISOR checkpoint (with viable_configs)")
    label.add_argument("--out", required=True, help="labels JSONL file to write")
    label.add_argument("--threshold", type=float, default=0.99, help="score ratio to the maximal configuration (default 0.99)")
    label.add_argument("--score", choices=["grader", "loglik"], default="grader",
                       help="grader: the task metric on the greedy answer; loglik: exp(mean answer-token log-prob)")
    _data_args(label, "train", 1000)
    label.set_defaults(func=run_label)

    relabel = verbs.add_parser("relabel", help="label stored per-configuration scores again at another threshold (no model run)",
                               description="Re-apply the label rule to the scores a `visor route label` file stores, at another "
                               "--threshold and/or by the other --score, without running the model again (a threshold "
                               "sweep costs seconds). Writes the same JSONL format, with its summary.")
    relabel.add_argument("labels", help="labels JSONL from `visor route label`")
    relabel.add_argument("--out", required=True, help="labels JSONL file to write")
    relabel.add_argument("--threshold", type=float, required=True, help="score ratio to the maximal configuration")
    relabel.add_argument("--score", choices=["grader", "loglik"], default=None,
                         help="which stored score labels (default: the one the file was labelled by)")
    relabel.set_defaults(func=run_relabel)

    train = verbs.add_parser("train", help="train the router on labels (backbone frozen) and save the checkpoint with it")
    train.add_argument("--model", required=True, help="universal VISOR checkpoint")
    train.add_argument("--labels", required=True, help="labels JSONL from `visor route label`")
    train.add_argument("--out", required=True, help="output checkpoint folder (model + router)")
    train.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    train.add_argument("--objective", choices=["label", "score"], default="label",
                       help="label: cross-entropy on the pseudo-label (the paper's router); score: predict each "
                            "configuration's score (--score-field) and route on predicted score minus budget x cost "
                            "(visor.routing.router); default label")
    train.add_argument("--score-field", choices=["grader", "loglik"], default="grader",
                       help="--objective score: the stored per-configuration score to predict (default grader)")
    train.add_argument("--label-field", default="label", choices=["label", "label_by_grader", "label_by_loglik"],
                       help="which label of the JSONL to fit (default: the one chosen at labelling)")
    train.add_argument("--read-after-layer", type=int, default=None, metavar="L",
                       help="decoder layer after which the router reads its token (default: the layer before the first SA "
                            "slot; it may read deeper: the routing pass runs CA-only, its extra layers are costed)")
    _data_args(train, "train", 1000)
    train.set_defaults(func=run_train)

    report = verbs.add_parser("report", help="router vs every fixed configuration: table, CSV/JSON, Pareto plot")
    report.add_argument("--model", required=True, help="VISOR checkpoint with a router")
    report.add_argument("--out", required=True, help="results folder")
    report.add_argument("--budget", type=float, action="append", default=None, help="router budget(s) to evaluate (default 0)")
    _data_args(report, "test", 500)
    report.set_defaults(func=run_report)


def _setup(args):
    import torch

    from visor.data.tokenizer import load_tokenizer
    from visor.eval.harness import llava_items, synth_items
    from visor.model.modeling import VisorForConditionalGeneration
    from visor.train.models import image_processor_for

    if args.threads:
        torch.set_num_threads(args.threads)
    model = VisorForConditionalGeneration.from_pretrained(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.data == "synth":
        items = synth_items(args.split, args.n, seed=args.seed,
                            config=synth_config_for(args.model, args.image_size, f"visor route {args.route_verb}"))
    else:
        items = [it for it in llava_items(args.data, args.image_root)[0] if it.problem is None][: args.n]
    return model, tokenizer, image_processor_for(model.config), items


def _viable(model) -> list:
    """SA slot tuples, or JSON-form configurations when some name a resolution (``visor.model.resolution``)."""
    viable = model.config.viable_configs
    if not viable:
        raise SystemExit("visor route: the checkpoint has no viable_configs (run `visor configs` and stage 2 first)")
    return [c if isinstance(c, dict) else tuple(c) for c in viable]


def _print_label_summary(rows: list[dict], out: str) -> None:
    from visor.routing.labels import label_summary

    summary = label_summary(rows)
    Path(out).with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    for family, counts in summary["per_family"].items():
        print(f"{family:<12} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"grader vs loglik labels agree on {100 * (summary['grader_loglik_agreement'] or 0):.1f}% of samples")
    for difficulty, c in summary["ceiling"].items():  # grader means on these items: fixed, oracle, family table
        fixed = ", ".join(f"{k} {100 * v:.1f}" for k, v in c["fixed"].items())
        print(f"{difficulty}: fixed {fixed}; items at their labels {100 * c['oracle']['score']:.1f} "
              f"({c['oracle']['mean_sa']:.2f} SA); family table {100 * c['family_table']['score']:.1f} "
              f"({c['family_table']['mean_sa']:.2f} SA)")
    print_json_line({"out": out, **summary})


def run_relabel(args: argparse.Namespace) -> int:
    from visor.routing.labels import read_labels, relabel, write_labels

    try:
        rows = relabel(read_labels(args.labels), args.threshold, args.score)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"visor route relabel: {args.labels}: {err!r}") from err
    if not rows:
        raise SystemExit(f"visor route relabel: {args.labels} holds no labels")
    write_labels(rows, args.out)
    _print_label_summary(rows, args.out)
    return 0


def run_label(args: argparse.Namespace) -> int:
    from visor.precision import autocast
    from visor.routing.labels import label_items, write_labels

    model, tokenizer, image_processor, items = _setup(args)
    model.float()  # weights may be shipped in bf16: the precision is the autocast's
    with autocast(args.precision):
        rows = label_items(model, tokenizer, image_processor, items, _viable(model), threshold=args.threshold,
                           score=args.score, batch_size=args.batch_size)
    write_labels(rows, args.out)
    _print_label_summary(rows, args.out)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from visor.precision import resolve_precision
    from visor.routing.labels import read_labels
    from visor.routing.train import save_router_checkpoint, train_router

    model, tokenizer, image_processor, items = _setup(args)
    rows = {row["id"]: row for row in read_labels(args.labels)}
    items = [it for it in items if it.id in rows]
    if not items:
        raise SystemExit("visor route train: no item of --data has a label in --labels (same --data/--split/--seed?)")
    from visor.model.resolution import parse_configuration

    configs = _viable(model)
    parsed = [parse_configuration(c, model.plan) for c in configs]
    labels = [parsed.index(parse_configuration(rows[it.id][args.label_field], model.plan)) for it in items]
    targets = None
    if args.objective == "score":
        from visor.routing.labels import score_targets

        try:
            targets = score_targets(rows, items, configs, model.plan, args.score_field)
        except ValueError as err:
            raise SystemExit(f"visor route train: --objective score: {err}") from None
    stored = next(model.parameters()).dtype
    model.float()  # compute in fp32 or bf16 autocast; the output keeps the input's storage dtype
    result = train_router(model, tokenizer, image_processor, items, labels, configs, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, read_after_layer=args.read_after_layer,
                          autocast=resolve_precision(args.precision) == "bf16", score_targets=targets)
    model.to(stored)
    out = save_router_checkpoint(model, tokenizer, image_processor, result, args.out, args.model)
    print_json_line({"out": str(out), "n": len(items), "label_distribution": dict(Counter(map(str, labels))),
                     "final": result["history"][-1], "reference_accuracy": result["reference_accuracy"]})
    return 0


def run_report(args: argparse.Namespace) -> int:
    from visor.precision import autocast
    from visor.routing.budget import choose_budget, describe
    from visor.routing.report import format_report, route_report

    model, tokenizer, image_processor, items = _setup(args)
    model.float()  # as in run_label
    with autocast(args.precision):
        report = route_report(model, tokenizer, image_processor, items, args.out, budgets=tuple(args.budget or [0.0]),
                              batch_size=args.batch_size)
    print(format_report(report))
    routed = [r for r in report["rows"] if r["method"].startswith("routed")]
    choice = choose_budget(report["rows"])
    print(f"the selection rule's pick on these items (visor.routing.budget; choose on validation, not test): "
          f"{describe(choice)}")
    print_json_line({"out": args.out, "routed": routed, "n_items": len(items), "budget_choice": choice})
    return 0
