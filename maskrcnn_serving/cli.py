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
import tempfile
from collections.abc import Callable, Iterator

import maskrcnn_serving
from maskrcnn_serving.errors import ModelLoadError

# Modules under maskrcnn_serving.commands; each defines register(subparsers) -> None.
COMMANDS = ("predict", "evaluate", "inspect", "serve", "bench", "export")
# How much of the captured native output a failed command shows.
NATIVE_LOG_TAIL_BYTES = 16384
_terminal_streams: list = []


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


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[Callable[[], str]]:
    """Send what native code writes to file descriptor 2 into a temporary file, while Python's ``sys.stderr``
    (progress bars, messages, logs set up inside the block) writes to the terminal. Yields a function that returns
    the captured tail. The terminal stream stays open afterwards: handlers created inside may still hold it."""
    sys.stderr.flush()
    terminal = os.dup(2)
    capture = tempfile.TemporaryFile()
    python_stderr = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=python_stderr.encoding, errors="replace")  # noqa: SIM115
    _terminal_streams.append(sys.stderr)  # kept open for good: log handlers made inside may still write to it
    os.dup2(capture.fileno(), 2)

    def tail() -> str:
        capture.flush()
        capture.seek(max(0, capture.seek(0, os.SEEK_END) - NATIVE_LOG_TAIL_BYTES))
        return capture.read().decode(errors="replace")

    try:
        yield tail
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr = python_stderr
        capture.close()


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
