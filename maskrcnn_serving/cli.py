"""``maskrcnn-serving``: the command line entry point.

Each subcommand lives in its own module under ``maskrcnn_serving.commands`` and registers itself with
``register(subparsers)``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from maskrcnn_serving.errors import ModelLoadError

# Modules under maskrcnn_serving.commands; each defines register(subparsers) -> None.
COMMANDS = ("predict", "evaluate", "inspect", "serve", "bench", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-serving",
        description="Serve, run and measure tensorpack / aws-samples Mask R-CNN checkpoints.",
    )
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"maskrcnn_serving.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ModelLoadError as exc:
        print(f"error: cannot load the model: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
