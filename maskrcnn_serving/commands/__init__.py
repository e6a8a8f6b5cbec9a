"""CLI subcommands; each module defines ``register(subparsers)``. Helpers shared by the commands that load a model,
and by those that run it over many files (here or on Ray: :class:`ImageRun`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from maskrcnn_serving.backends.base import BACKENDS
from maskrcnn_serving.errors import ServingError
from maskrcnn_serving.settings import Limits, Settings

if TYPE_CHECKING:  # the pipeline (and TensorFlow) load only when a command runs
    from maskrcnn_serving.distributed import Outcome, RayCluster, Work
    from maskrcnn_serving.model_dir import ModelBundle
    from maskrcnn_serving.pipeline import Pipeline
    from maskrcnn_serving.request import RequestOptions
    from maskrcnn_serving.sources import ImageFile

T = TypeVar("T")

# Files named on the command line are the user's own: no decompression-bomb guard, no request-size limits, TIFF too.
LOCAL_FILE_LIMITS = Limits(max_request_bytes=1 << 62, max_response_bytes=1 << 62, max_image_pixels=1 << 62,
                           max_images=1 << 30, tiff=True)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model-dir and --backend, shared by every command that loads a model."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help="Model directory with the checkpoint and optional config.json (default: $SM_MODEL_DIR or /opt/ml/model).",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=sorted(BACKENDS),
        help="Inference backend (default: $MODEL_SERVER_BACKEND or tensorpack).",
    )


def settings_from_args(args: argparse.Namespace, **overrides) -> Settings:
    """The process's settings (environment) with ``--model-dir`` / ``--backend`` and ``overrides`` applied."""
    return Settings.from_env(os.environ, model_dir=args.model_dir, backend=args.backend, **overrides)


def open_pipeline(settings: Settings, limits: Limits = LOCAL_FILE_LIMITS, environ: Mapping[str, str] | None = None):
    """Load the settings' model and backend and return its :class:`~maskrcnn_serving.pipeline.Pipeline`
    (``environ``: where the model config's ``CONFIG__*`` overrides are read; default the process's)."""
    from maskrcnn_serving.backends.base import load_backend
    from maskrcnn_serving.pipeline import Pipeline

    backend = load_backend(settings.backend, settings.model_dir, settings, environ)
    return Pipeline(backend, limits=limits)


def exit_on_refused(results: Iterable[T]) -> Iterator[T]:
    """``results`` (of :meth:`Pipeline.run_files <maskrcnn_serving.pipeline.Pipeline.run_files>`, or of a local
    :class:`ImageRun`), ending the command with ``error: PATH: message`` at the first file the pipeline refuses (not
    an image, too large...)."""
    try:
        yield from results
    except ServingError as exc:
        raise SystemExit(f"error: {exc.message}") from None


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS], --actors, --cpus-per-actor, --gpus-per-actor: the commands that run over many files."""
    group = parser.add_argument_group("on a Ray cluster (pip install 'maskrcnn-serving[ray]'; docs/scale-out.md)")
    group.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="Run on Ray, one model per actor: without ADDRESS a local Ray started for the run (put --ray after the "
             "inputs, or before another option), 'auto' the cluster this machine is in, else that cluster's address "
             "(HOST:6379, ray://HOST:10001). Refused images are reported and skipped.")
    group.add_argument("--actors", type=int, default=None, help="Actors, each with its own model (default 1).")
    group.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs Ray reserves per actor (default 1).")
    group.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs Ray reserves per actor (default 0).")


def ray_cluster(args: argparse.Namespace) -> RayCluster | None:
    """The Ray run the arguments ask for, None for a run in this process; SystemExit for options that do not fit."""
    from maskrcnn_serving.distributed import RayCluster

    sizes = {"--actors": args.actors, "--cpus-per-actor": args.cpus_per_actor, "--gpus-per-actor": args.gpus_per_actor}
    if args.ray is None:
        given = [name for name, value in sizes.items() if value is not None]
        if given:
            raise SystemExit(f"error: {', '.join(given)} only apply with --ray")
        return None
    if args.ray and Path(args.ray).exists():
        raise SystemExit(f"error: --ray took {args.ray!r} as the cluster's address, but it is a file or folder: put "
                         "--ray after the inputs, or give an address (--ray auto)")
    defaults = RayCluster()
    cluster = RayCluster(
        address=args.ray or None,
        actors=defaults.actors if args.actors is None else args.actors,
        cpus_per_actor=defaults.cpus_per_actor if args.cpus_per_actor is None else args.cpus_per_actor,
        gpus_per_actor=defaults.gpus_per_actor if args.gpus_per_actor is None else args.gpus_per_actor,
        verbose=bool(getattr(args, "verbose", False)),
    )
    if cluster.actors < 1 or cluster.cpus_per_actor < 0 or cluster.gpus_per_actor < 0:
        raise SystemExit("error: --actors must be at least 1, and the resources per actor not negative")
    return cluster


@dataclass
class ImageRun:
    """How a command runs the model over its files: in this process (``pipeline`` loaded), or on Ray (``cluster``;
    the model directory checked here, then loaded by every actor). ``bundle``: the model's directory, config and
    architecture, for the command's options. ``refused``: how many files the runs refused (on Ray)."""

    settings: Settings
    bundle: ModelBundle
    pipeline: Pipeline | None = None
    cluster: RayCluster | None = None
    refused: int = 0

    @classmethod
    def open(cls, args: argparse.Namespace) -> ImageRun:
        settings = settings_from_args(args)
        cluster = ray_cluster(args)
        if cluster is None:
            pipeline = open_pipeline(settings)
            return cls(settings, pipeline.backend.bundle, pipeline)
        from maskrcnn_serving.backends.base import get_backend_class
        from maskrcnn_serving.model_dir import load_model_dir

        get_backend_class(settings.backend).check_settings(settings)
        bundle = load_model_dir(settings.model_dir)  # refused here, before any actor tries
        return cls(dataclasses.replace(settings, model_dir=str(bundle.model_dir.resolve())), bundle, cluster=cluster)

    def run(self, files: Sequence[ImageFile], options: RequestOptions, work: Work, desc: str) -> Iterator[Outcome]:
        """The :class:`~maskrcnn_serving.distributed.Outcome` of each file the pipeline accepts; ``work`` runs where
        the model does. Here: in order, and a refused file ends the command (``error: PATH: message``). On Ray: as
        the actors finish, and a refused file is reported (``skipped PATH: message``), counted, and left out."""
        from tqdm import tqdm

        if not files:  # nothing left to run (all done before): no Ray to start
            return
        for outcome in exit_on_refused(self._outcomes(files, options, work, desc)):
            if outcome.error is None:
                yield outcome
            else:
                self.refused += 1
                tqdm.write(f"skipped {outcome.error}", file=sys.stderr)

    def _outcomes(self, files: Sequence[ImageFile], options: RequestOptions, work: Work,
                  desc: str) -> Iterator[Outcome]:
        from maskrcnn_serving.distributed import run_here, run_on_ray

        if self.pipeline is not None:
            return run_here(self.pipeline, files, options, work, desc)
        from maskrcnn_serving.backends.base import get_backend_class
        from maskrcnn_serving.config import config_environment

        make_pipeline = functools.partial(open_pipeline, self.settings, LOCAL_FILE_LIMITS,
                                          config_environment(os.environ))
        batch_size = get_backend_class(self.settings.backend).batch_size_for(self.settings)
        return run_on_ray(files, make_pipeline, options, work, self.cluster, batch_size, desc)
