"""Many image files through the pipeline, in this process or on a Ray cluster, for ``predict`` and ``index build``.

Both run the one :class:`~maskrcnn_serving.pipeline.Pipeline` and give back one :class:`Outcome` per file: what a
``work`` function made of the file's :class:`~maskrcnn_serving.request.ImageResult` (a JSON value: COCO results
records, index rows), or why the file was refused. The caller writes the outcomes (results files, the index) as
they come, in this process, so that every file is written once, by one writer, whatever happened to the workers.

On Ray (https://docs.ray.io/en/latest/data/batch_inference.html): the files become a Ray Dataset, and
``map_batches`` runs them through an actor pool (:class:`PipelineActor`), each actor holding one model, loaded once.
Each call takes a batch of :meth:`Backend.batch_size_for <maskrcnn_serving.backends.base.Backend.batch_size_for>`
files as one pipeline request (the scheduler forms the backend's forward calls). Ray restarts an actor whose
process died and retries its unfinished batches; :func:`run_on_ray` yields each file's outcome once even if a
retried batch delivers it again. A work's value travels from an actor to the driver as JSON text: a string column,
which Ray Data carries as it is (an object column it would turn into Arrow structs and arrays, or pickle), and
plain data, never code, reaching the process that writes. The actors read the files themselves
(:meth:`ImageFile.read_bytes`), so no read task competes with them for CPUs. Ray is imported only here, and only
when a run asks for it (``pip install 'maskrcnn-serving[ray]'``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from maskrcnn_serving.errors import ServingError
from maskrcnn_serving.pipeline import Pipeline, StageTimes
from maskrcnn_serving.request import ImageRequest, ImageResult, RequestOptions
from maskrcnn_serving.sources import ImageFile

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

#: What a run does with each image's result, where the image ran (e.g. its COCO records, its index rows): a JSON
#: value (dicts, lists, strings, numbers), the same in this process and from a Ray actor.
Work = Callable[[ImageFile, ImageResult], Any]
#: Retries of a batch whose actor died; a file that kills its worker every time then fails the run, not loops.
ACTOR_TASK_RETRIES = 3


@dataclass(frozen=True)
class Outcome:
    """What became of one file: ``value`` (the work's) or ``error`` (why the pipeline refused the file)."""

    file: ImageFile
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class RayCluster:
    """Where and how wide a Ray run is.

    address: None to start a local Ray in this process (on loopback, stopped at the end); ``auto`` for the cluster
        this machine belongs to; or a cluster's address (``HOST:6379``, ``ray://HOST:10001``).
    actors: how many actors, each holding one loaded model.
    cpus_per_actor, gpus_per_actor: the resources Ray reserves for each (fractions allowed).
    verbose: let the actors' output (TensorFlow's start-up messages among it) reach this terminal.
    """

    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    verbose: bool = False


def run_here(pipeline: Pipeline, files: Sequence[ImageFile], options: RequestOptions, work: Work,
             desc: str) -> Iterator[Outcome]:
    """Each file through ``pipeline`` in this process, in order, with a progress bar. A refused file ends the run
    (its :class:`ServingError`, naming the file): a local run stops where the user can fix it."""
    results = pipeline.run_files(tqdm(files, desc=desc, unit="img"), options)
    for result, file in zip(results, files, strict=True):  # results first: the bar ends when they do
        yield Outcome(file, work(file, result))


def run_batch(pipeline: Pipeline, files: Sequence[ImageFile], options: RequestOptions, work: Work) -> list[Outcome]:
    """``files`` as one pipeline request (the scheduler batches their forward calls); when the pipeline refuses
    it, each file alone, so that a refused file is reported and the others still run."""
    try:
        results = pipeline.process([ImageRequest(str(f), f, options) for f in files], StageTimes())
    except ServingError:  # one refused file refuses the request: which one(s), and the others' results
        return [_alone(pipeline, file, options, work) for file in files]
    return [Outcome(file, work(file, result)) for file, result in zip(files, results, strict=True)]


def _alone(pipeline: Pipeline, file: ImageFile, options: RequestOptions, work: Work) -> Outcome:
    try:
        (result,) = pipeline.run_files([file], options)
    except ServingError as exc:
        return Outcome(file, error=exc.message)
    return Outcome(file, work(file, result))


class PipelineActor:
    """One Ray actor: a pipeline made once by ``make_pipeline`` (the model loaded), then batches of files."""

    def __init__(self, make_pipeline: Callable[[], Pipeline], options: RequestOptions, work: Work) -> None:
        self.pipeline = make_pipeline()
        self.options = options
        self.work = work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """``batch``: columns ``location``, ``name``, ``source`` (an :class:`ImageFile` per row). Returns columns
        ``source``, ``error`` (empty when the file ran) and ``value`` (the work's value as JSON text)."""
        columns = (batch["location"], batch["name"], batch["source"])
        files = [ImageFile(*(str(value) for value in fields)) for fields in zip(*columns, strict=True)]
        outcomes = run_batch(self.pipeline, files, self.options, self.work)
        return {"source": [o.file.source for o in outcomes], "error": [o.error or "" for o in outcomes],
                "value": [json.dumps(o.value) for o in outcomes]}


def run_on_ray(files: Sequence[ImageFile], make_pipeline: Callable[[], Pipeline], options: RequestOptions,
               work: Work, cluster: RayCluster, batch_size: int, desc: str) -> Iterator[Outcome]:
    """Each file through a pool of :class:`PipelineActor` on ``cluster``, ``batch_size`` files per call; yields
    each file's outcome once, as the actors finish them (not in order), with a progress bar. ``make_pipeline``
    and ``work`` run in the actors: they must be importable there (module-level functions, or partials of them)."""
    import ray

    started = _connect(ray, cluster)
    try:
        yield from _outcomes(_dataset(files, make_pipeline, options, work, cluster, batch_size), files, desc)
    finally:
        if started:
            ray.shutdown()


def _connect(ray, cluster: RayCluster) -> bool:
    """Join ``cluster.address`` (or start a local Ray); whether this process started it."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": cluster.verbose, "logging_level": logging.INFO if cluster.verbose else logging.ERROR}
    if cluster.address is None:
        # a local Ray for this run: on loopback (a Ray cluster runs any code its clients send), no dashboard
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
    else:
        ray.init(address=cluster.address, **quiet)
    wanted = {"CPU": cluster.actors * cluster.cpus_per_actor, "GPU": cluster.actors * cluster.gpus_per_actor}
    have = ray.cluster_resources()
    for resource, amount in wanted.items():
        if amount > have.get(resource, 0):
            log.warning("%g actors x %s %s need %g; the cluster has %g now: the run waits for nodes to join",
                        cluster.actors, amount / cluster.actors, resource, amount, have.get(resource, 0))
    return cluster.address is None


def _dataset(files: Sequence[ImageFile], make_pipeline, options, work, cluster: RayCluster, batch_size: int):
    import ray.data

    if not cluster.verbose:  # Ray Data's notices on the terminal (its log file in the session folder keeps them)
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run shows its own, as a local run does
    context.print_on_execution_start = False
    rows = [{"location": f.location, "name": f.name, "source": f.source} for f in files]
    with warnings.catch_warnings():
        # Ray 2.60 takes max_task_retries only as a free remote argument, which it marks deprecated (no named one)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ray.data.from_items(rows).map_batches(
            PipelineActor,
            fn_constructor_args=(make_pipeline, options, work),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cluster.actors),
            num_cpus=cluster.cpus_per_actor,
            num_gpus=cluster.gpus_per_actor or None,
            # GPU memory on demand, as serve's workers take it: actors sharing a GPU (--gpus-per-actor 0.5) fit
            runtime_env={"env_vars": {"TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH",
                                                                                "true")}},
            max_task_retries=ACTOR_TASK_RETRIES,
        )


def _outcomes(dataset, files: Sequence[ImageFile], desc: str) -> Iterable[Outcome]:
    by_source = {f.source: f for f in files}
    delivered: set[str] = set()
    with tqdm(total=len(files), desc=desc, unit="img") as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for source, error, value in zip(batch["source"], batch["error"], batch["value"], strict=True):
                if source in delivered:  # a retried batch delivered it again
                    continue
                delivered.add(source)
                progress.update()
                file = by_source[source]
                yield Outcome(file, error=str(error)) if error else Outcome(file, json.loads(value))
