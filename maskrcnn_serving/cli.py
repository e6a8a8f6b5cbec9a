"""``maskrcnn-serving``: the command line entry point.

Each subcommand lives in its own module under ``maskrcnn_serving.commands`` and registers itself with
``register(subparsers)``; this file only wires them together, and keeps TensorFlow's native start-up messages
(oneDNN notices, "failed call to cuInit" on a machine without a GPU) out of the terminal unless ``--verbose`` or
``TF_CPP_MIN_LOG_LEVEL`` asks for them: they are printed by TensorFlow's C++ code before its log level applies, so
they are caught at the file descriptor and shown only when the command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

import maskrcnn_serving
from maskrcnn_serving.errors import ModelLoadError
from maskrcnn_serving.native_stderr import native_stderr_captured

# Modules under maskrcnn_serving.commands; each defines register(subparsers) -> None.
COMMANDS = ("predict", "evaluate", "inspect", "serve", "bench", "export", "index")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn-serving",
        description="Serve, run and measure tensorpack / aws-samples Mask R-CNN checkpoints.",
    )
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING).")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="Also show TensorFlow's native start-up messages (hidden by default).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"maskrcnn_serving.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = not (args.verbose or maskrcnn_serving.TF_LOG_LEVEL_FROM_USER)
    with native_stderr_captured() if quiet else contextlib.nullcontext() as native_tail:
        if quiet:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # once TF's logging is up, its errors are ours to report
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return int(args.func(args) or 0)
        except ModelLoadError as exc:
            print(f"error: cannot load the model: {exc}", file=sys.stderr)
            return 2
        except Exception:
            if native_tail is not None and native_tail().strip():  # a crash: what TensorFlow said may explain it
                print(f"TensorFlow's native messages before the failure:\n{native_tail()}", file=sys.stderr)
            raise


if __name__ == "__main__":
    sys.exit(main())
