"""The one inference pipeline: image requests in, detections, annotation records and the caller's answer out.

Every caller goes through it: the HTTP server (:meth:`Pipeline.handle`, with a request its codec
:mod:`maskrcnn_serving.wire` parsed) and its warm-up, ``predict``, ``eval``, ``index`` (:meth:`Pipeline.run_files`)
and ``bench``. It knows no protocol: its requests and results are :mod:`maskrcnn_serving.request`'s, its
post-processing is :mod:`maskrcnn_serving.postprocess`, and a protocol layer gives it, with the images, the
answer's writer and size budget (:class:`ProtocolRequest`, :class:`ResponseBudget`). The stages, in order, and
where they run:

=============  ==================================================================  ===============
stage          work                                                                thread
=============  ==================================================================  ===============
decode         image files (bytes, paths, the codec's base64) -> BGR pixels        the caller's
               (:mod:`.imaging`)
preprocess     test-time resize (:meth:`Backend.preprocess`)                       the caller's
queue          waiting for the model (other requests' batches)                     --
model          the forward calls that ran this request's images                    the scheduler's
postprocess    class filter, ``max_detections``, mask pasting at box size          the caller's
search         nearest indexed instances (``neighbours``; :mod:`.search.service`)  the caller's
encode         RLE / polygons / boxes records (:mod:`.postprocess`), and the       the caller's
               answer's body (:meth:`ProtocolRequest.encode`)
=============  ==================================================================  ===============

The search runs before the masks are pasted, so that the answer's size, counted while it is made
(:class:`ResponseBudget`), includes every search field before any mask is: an answer too large with them is refused
(413) before the search when the embeddings already make it so, and before any mask otherwise.

The caller times each stage directly (:class:`StageTimes`); the model stage is the wall time of the forward calls
that held the request's images, as measured on the scheduler's thread, and the queue stage the rest of the wait.
A request's :class:`~maskrcnn_serving.deadline.Deadline` is checked in every stage.
"""

from __future__ import annotations

import enum
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

from maskrcnn_serving import imaging, postprocess
from maskrcnn_serving.backends.base import Backend, PredictOptions, PreparedImage
from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import SearchNotConfigured, ServingError
from maskrcnn_serving.request import FileSource, ImageRequest, ImageResult, RequestOptions
from maskrcnn_serving.scheduler import Scheduler
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.structures import Detections

if TYPE_CHECKING:  # the index (and its database client) is only needed where a server opens one
    from maskrcnn_serving.search.index import Neighbour
    from maskrcnn_serving.search.service import SearchService


# Masks of an image whose boxes cover at least this many pixels are pasted and encoded by ANNOTATION_WORKERS threads
# at once (Pipeline._annotation_records); below it, the threads' hand-offs would cost more than they save. Only for
# the formats whose encoders work on pixels (COCO RLE transposes each mask, polygons trace it; NumPy and OpenCV let
# go of the GIL there): the legacy RLE is read from the paste's runs, Python-bound work that a second thread slows
# (a 12-megapixel photo's 100 masks, best of 9: 0.053 s on one thread, 0.067 s on two; COCO RLE 0.148 s and 0.108 s).
PARALLEL_PASTE_AREA = 2_000_000
PARALLEL_PASTE_FORMATS = frozenset({"coco", "polygon"})
ANNOTATION_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@cache
def _annotation_pool() -> ThreadPoolExecutor:
    """The process's annotation workers, shared by its pipelines and request threads (made on first use, so a
    server's master never forks them)."""
    return ThreadPoolExecutor(ANNOTATION_WORKERS, thread_name_prefix="annotate")


class Stage(enum.StrEnum):
    DECODE = "decode"
    PREPROCESS = "preprocess"
    QUEUE = "queue"
    MODEL = "model"
    POSTPROCESS = "postprocess"
    SEARCH = "search"
    ENCODE = "encode"


STAGES: tuple[str, ...] = tuple(stage.value for stage in Stage)


@dataclass
class StageTimes:
    """Seconds per stage of one request (summed when a stage runs several times, or on several threads at once: the
    annotation workers' postprocess and encode seconds can add up to more than the wall time they took)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: Stage, seconds: float) -> None:
        self.seconds[stage.value] = self.seconds.get(stage.value, 0.0) + seconds

    @contextmanager
    def measure(self, stage: Stage) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)


class ResponseBudget(Protocol):
    """The running size of an answer being made, held to the caller's limit, so that an answer over it is refused
    (413) before the work that would make it. Sizes are the protocol's (the HTTP codec counts JSON bytes:
    :class:`maskrcnn_serving.wire.ResponseSize`); the pipeline only says when records are known and made."""

    def add_floor(self, dets: Detections, options: RequestOptions) -> list[int]:
        """Count the smallest records ``dets`` can have in ``options.format`` (before any mask is pasted and before
        the search: their embeddings as they are, no neighbours), raising when that is already over the limit;
        returns each record's floor."""
        ...

    def add_neighbours(self, floors: list[int], neighbours: Sequence[Sequence[Neighbour]]) -> list[int]:
        """Count the neighbours the search found for each record, raising when the total goes over the limit;
        returns the records' floors with them."""
        ...

    def add_record(self, record: dict, floor: int) -> None:
        """Replace a record's ``floor`` by its real size, raising when the total goes over the limit."""
        ...


class ProtocolRequest(Protocol):
    """A request as a protocol layer hands it to :meth:`Pipeline.handle` (the HTTP codec's
    :class:`maskrcnn_serving.wire.ParsedRequest`): its images, and how its answer is counted and written."""

    images: Sequence[ImageRequest]

    def response_budget(self, limits: Limits) -> ResponseBudget: ...

    def encode(self, results: Sequence[ImageResult], limits: Limits) -> bytes: ...


@dataclass
class Response:
    """What one request produced: the response body, each image's result, and the seconds per stage."""

    body: bytes
    images: list[ImageResult]
    stages: dict[str, float]

    @property
    def detection_count(self) -> int:
        return sum(len(r.detections) for r in self.images)


class Pipeline:
    """decode -> preprocess -> (queue) -> model -> postprocess -> encode, for one loaded backend.

    ``scheduler``: forms the forward calls (default: a new one over ``backend`` with no batching delay, for
    in-process use; the server passes one with its delay). ``limits``: what one request may hold and answer.
    ``index``: the server's instance search, for the ``neighbours`` option (None: refused with 400).
    """

    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler | None = None,
        limits: Limits | None = None,
        index: SearchService | None = None,
    ) -> None:
        self.backend = backend
        self.scheduler = scheduler if scheduler is not None else Scheduler.for_backend(backend)
        self.limits = limits or Limits()
        self.index = index
        self.inference = backend.bundle.inference

    def close(self) -> None:
        """Stop the scheduler's thread (the backend stays loaded)."""
        self.scheduler.close()

    # ------------------------------------------------------------------------------------------ requests
    def default_options(self) -> RequestOptions:
        """The seed tensorpack container's behaviour: score threshold ``TEST.RESULT_SCORE_THRESH_VIS``, mask
        threshold 0.5, ``TEST.RESULTS_PER_IM`` detections, legacy format (boxes for a model without masks)."""
        return RequestOptions(
            score_threshold=self.inference.vis_score_threshold,
            format="legacy" if self.backend.has_masks else "boxes",
        )

    def handle(
        self, request: ProtocolRequest, deadline: Deadline = NO_DEADLINE, times: StageTimes | None = None
    ) -> Response:
        """Run a protocol's request through every stage; the body is its answer, written by the request
        (:meth:`ProtocolRequest.encode`) and held to the response limit while it is made. ``times`` collects the
        stage times as they happen (a new one by default)."""
        times = times if times is not None else StageTimes()
        results = self.process(request.images, times, deadline, request.response_budget(self.limits))
        deadline.check("it was still encoding its answer")
        with times.measure(Stage.ENCODE):
            body = request.encode(results, self.limits)
        return Response(body, results, times.seconds)

    def run_files(
        self, files: Iterable[FileSource | bytes], options: RequestOptions, times: StageTimes | None = None
    ) -> Iterator[ImageResult]:
        """Each image file as a request of its own, in order: how ``predict``, ``eval``, ``index`` and the server's
        warm-up run the model. A file (a :class:`~pathlib.Path`, a :class:`maskrcnn_serving.sources.ImageFile`) is
        read in the decode stage and its text is the result's ``img_id`` (None for bytes); a client error about a
        file names it (``PATH: message``). ``files`` is consumed as the results are:
        the next file is taken only once the last result has been, so a caller may decide about the next file from
        what the last one did (``index build`` skips images already indexed), and a progress bar wrapped around
        ``files`` moves as the work does. ``times`` sums the stage times of every file (a new one by default)."""
        times = times if times is not None else StageTimes()
        for file in files:
            img_id = None if isinstance(file, bytes) else str(file)
            try:
                (result,) = self.process([ImageRequest(img_id, file, options)], times)
            except ServingError as exc:
                if img_id is None:
                    raise
                raise type(exc)(f"{img_id}: {exc.message}") from None
            yield result

    def process(
        self,
        items: Sequence[ImageRequest],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
        budget: ResponseBudget | None = None,
    ) -> list[ImageResult]:
        """Every stage but the answer's body: each item's detections and annotations. ``budget``: refuse (413)
        annotations that would not fit the caller's response limit as soon as that is known (:meth:`handle`)."""
        if any(item.options.neighbours for item in items):  # refused before any work
            if self.index is None:
                raise SearchNotConfigured("neighbours needs an instance index, and this server has none (start it "
                                          "with `serve --index DB`).")
            self.index.check_available()
        images = self.decode(items, times, deadline)
        detections = self.run_model(images, [item.options for item in items], times, deadline)
        with times.measure(Stage.POSTPROCESS):
            detections = [self.select(dets, item.options) for dets, item in zip(detections, items, strict=True)]
        with times.measure(Stage.ENCODE):  # the answer's least size: before the search and the masks
            floors = [budget.add_floor(dets, item.options) if budget else [0] * len(dets)
                      for item, dets in zip(items, detections, strict=True)]
        neighbours = self.search(items, detections, times, deadline)
        if budget is not None:
            with times.measure(Stage.ENCODE):  # with the neighbours found: before the masks
                floors = [floor if found is None else budget.add_neighbours(floor, found)
                          for floor, found in zip(floors, neighbours, strict=True)]
        annotations = self.annotate(items, detections, neighbours, floors, times, deadline, budget)
        return [
            ImageResult(item.img_id, image, dets, records)
            for item, image, dets, records in zip(items, images, detections, annotations, strict=True)
        ]

    # ------------------------------------------------------------------------------------------ stages
    def predict_options(self, options: RequestOptions) -> PredictOptions:
        """What the graph is asked for. With a class filter it returns at least ``TEST.RESULTS_PER_IM``
        detections, so that the filter sees the full list; ``max_detections`` is applied after the filter."""
        graph_max = options.max_detections
        if options.classes is not None:
            graph_max = max(options.max_detections or 0, self.inference.results_per_image)
        return PredictOptions(options.score_threshold, graph_max, options.embeddings or bool(options.neighbours))

    def decode(
        self, items: Sequence[ImageRequest], times: StageTimes, deadline: Deadline = NO_DEADLINE
    ) -> list[np.ndarray]:
        """The items' images as (H, W, 3) BGR uint8, through the decoding gate, within the request's limits."""
        with times.measure(Stage.DECODE):
            files = [item.file_bytes() for item in items]
            return imaging.decode_images(files, self.limits.max_image_pixels, deadline, self.limits.tiff)

    def select(self, detections: Detections, options: RequestOptions) -> Detections:
        """The class filter, then ``max_detections`` (the graph already applied the score threshold)."""
        return postprocess.filter_detections(detections, options, self.inference.results_per_image)

    def run_model(
        self,
        images: Sequence[np.ndarray],
        options: Sequence[RequestOptions],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
    ) -> list[Detections]:
        """preprocess, queue and model for decoded images (unfiltered detections).

        The images are prepared as the model takes them, at most :meth:`in_flight` at a time: a prepared image is
        larger than a small decoded one (a 10 x 10 image becomes 800 x 1333 at the usual test size), so preparing
        all of a many-image request first would hold hundreds of megabytes no request limit accounts for."""
        preprocess_before = times.seconds.get(Stage.PREPROCESS.value, 0.0)

        def prepared() -> Iterator[PreparedImage]:
            for image in images:
                deadline.check("it was still preparing its images")
                with times.measure(Stage.PREPROCESS):
                    ready = self.backend.preprocess(image)
                yield ready

        started = time.perf_counter()
        results = self.scheduler.run(prepared(), [self.predict_options(o) for o in options], deadline,
                                     self.in_flight())
        preprocessing = times.seconds.get(Stage.PREPROCESS.value, 0.0) - preprocess_before
        waited = time.perf_counter() - started - preprocessing
        model = sum({r.batch_id: r.batch_seconds for r in results}.values())
        times.add(Stage.MODEL, model)
        times.add(Stage.QUEUE, max(0.0, waited - model))
        return [r.detections for r in results]

    def in_flight(self) -> int:
        """How many of one request's prepared images may wait for or be in the model at once: two full batches, so
        that the next batch is queued while one runs."""
        return max(2, 2 * self.scheduler.max_batch_size)

    def search(
        self,
        items: Sequence[ImageRequest],
        detections: Sequence[Detections],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
    ) -> list[list[list[Neighbour]] | None]:
        """search: each instance's nearest indexed instances, per image where its options ask for them
        (``neighbours``, ``same_class``; None elsewhere). Timed as one stage, zero for requests that ask for none."""
        found: list[list[list[Neighbour]] | None] = []
        with times.measure(Stage.SEARCH):
            for item, dets in zip(items, detections, strict=True):
                options = item.options
                neighbours = None
                if options.neighbours:
                    deadline.check("it was still searching the index")
                    categories = dets.labels if options.same_class else None
                    neighbours = self.index.search(dets.embeddings, options.neighbours, categories, deadline)
                found.append(neighbours)
        return found

    def annotate(
        self,
        items: Sequence[ImageRequest],
        detections: Sequence[Detections],
        neighbours: Sequence[Sequence[Sequence[Neighbour]] | None],
        floors: Sequence[list[int]],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
        budget: ResponseBudget | None = None,
    ) -> list[list[dict]]:
        """postprocess (mask pasting at box size) and encode: each image's annotation records in its format, with
        the search fields its options ask for (the embeddings, and ``neighbours`` as :meth:`search` found them).

        A few detections at a time, so that memory holds a few pasted masks, not all of them (1000 detections of a
        large photo are gigabytes of masks). The response's size is counted as the records are made (with a ``budget``):
        each record's ``floors`` entry (its smallest size, counted before) is replaced by its real size as it is
        made, so a 413 comes before the work it would throw away. Small boxes first: a mask's encoding grows with its
        box's side and its pasting with its area, so an answer over the limit is found with the least pasting; the
        records keep the detections' order. The deadline is checked per detection. Large masks are made by a few
        worker threads at once and taken in the same order (:meth:`_annotation_records`)."""
        annotations = []
        for item, dets, found, floor in zip(items, detections, neighbours, floors, strict=True):
            records: list[dict] = [{}] * len(dets)
            sides = dets.boxes[:, 2:] - dets.boxes[:, :2]
            areas = sides[:, 0] * sides[:, 1]
            order = np.argsort(areas, kind="stable")
            made = self._annotation_records(dets, item.options, order, areas.sum(), deadline)
            for index, (one, paste_s, encode_s, record) in zip(order, made, strict=True):
                times.add(Stage.POSTPROCESS, paste_s)
                with times.measure(Stage.ENCODE):
                    postprocess.add_search_fields([record], one, item.options,
                                                  None if found is None else [found[index]])
                    if budget is not None:
                        budget.add_record(record, floor[index])
                times.add(Stage.ENCODE, encode_s)
                records[index] = record
            annotations.append(records)
        return annotations

    def _annotation_records(
        self, dets: Detections, options: RequestOptions, order: np.ndarray, box_area: float, deadline: Deadline
    ) -> Iterator[tuple[Detections, float, float, dict]]:
        """(the detection, paste seconds, encode seconds, record) of each one in ``order``, made one after the
        other, or, when the boxes cover at least :data:`PARALLEL_PASTE_AREA` pixels and the format works on pixels
        (:data:`PARALLEL_PASTE_FORMATS`), by the annotation workers a few ahead. At most ``2 x workers`` records
        wait to be taken, so memory holds a few masks and a 413 wastes little; a consumer that stops early cancels
        the rest."""
        def make(index: int) -> tuple[Detections, float, float, dict]:
            one = dets.select([index])
            start = time.perf_counter()
            masks = postprocess.paste_for_options(one, options)
            pasted = time.perf_counter()
            (record,) = postprocess.encode_annotations(one, options, masks)
            return one, pasted - start, time.perf_counter() - pasted, record

        if (box_area < PARALLEL_PASTE_AREA or len(order) < 2 or ANNOTATION_WORKERS < 2
                or options.format not in PARALLEL_PASTE_FORMATS):
            for index in order:
                deadline.check("it was still encoding its answer")
                yield make(int(index))
            return
        pending: deque[Future] = deque()
        upcoming = iter(order)
        try:
            while True:
                while len(pending) < 2 * ANNOTATION_WORKERS:
                    index = next(upcoming, None)
                    if index is None:
                        break
                    deadline.check("it was still encoding its answer")
                    pending.append(_annotation_pool().submit(make, int(index)))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
