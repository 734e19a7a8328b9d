"""The ``visor`` command line.

Each verb lives in its own module under ``visor/cli`` and exposes ``register(subparsers)``, which adds
an ``argparse`` sub-parser whose ``func`` default runs the verb. Verbs are imported lazily by name so
``visor --help`` stays fast and one broken optional verb cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb module names under visor.cli, in the order ``--help`` lists them
VERB_MODULES: tuple[str, ...] = (
    "convert",
    "generate",
    "cost",
    "bench",
    "data",
    "eval",
    "train",
    "configs",
    "route",
    "serve",
    "reproduce",
    "analyze",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visor",
        description="VISOR: sparse, per-sample vision-language interactions for LLaVA-OneVision.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"visor.cli.{name}")
        except ImportError as err:  # a verb whose optional dependencies are missing reports it when used
            broken = subparsers.add_parser(name, help=f"(unavailable: {err})")
            broken.set_defaults(func=lambda args, err=err, name=name: _unavailable(name, err))
            continue
        module.register(subparsers)
    return parser


def _unavailable(name: str, err: ImportError) -> int:
    print(f"visor {name}: unavailable in this installation ({err})", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
