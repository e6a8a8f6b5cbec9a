"""The one inference pipeline: request items in, detections and response bytes out.

Every caller goes through it: the HTTP server (and its warm-up), ``predict``, ``eval``, ``index`` and ``bench``.
The stages, in order, and where they run:

=============  ==================================================================  ===============
stage          work                                                                thread
=============  ==================================================================  ===============
decode         base64 and image file bytes -> BGR pixels (:mod:`.imaging`)         the caller's
preprocess     test-time resize (:meth:`Backend.preprocess`)                       the caller's
queue          waiting for the model (other requests' batches)                     --
model          the forward calls that ran this request's images                    the scheduler's
postprocess    class filter, ``max_detections``, mask pasting at box size          the caller's
search         nearest indexed instances (``neighbours``; :mod:`.search.index`)    the caller's
encode         RLE / polygons / boxes records and the JSON body (:mod:`.wire`)     the caller's
=============  ==================================================================  ===============

The caller times each stage directly (:class:`StageTimes`); the model stage is the wall time of the forward calls
that held the request's images, as measured on the scheduler's thread, and the queue stage the rest of the wait.
A request's :class:`~maskrcnn_serving.deadline.Deadline` is checked in every stage.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from maskrcnn_serving import imaging, wire
from maskrcnn_serving.backends.base import Backend, PredictOptions, PreparedImage
from maskrcnn_serving.deadline import NO_DEADLINE, Deadline
from maskrcnn_serving.errors import SearchUnavailable
from maskrcnn_serving.scheduler import Scheduler
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.structures import Detections

if TYPE_CHECKING:  # the index (and its database client) is only needed where a server or command opens one
    from maskrcnn_serving.search.index import InstanceIndex


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
    """Seconds per stage of one request (summed when a stage runs several times)."""

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


@dataclass
class ImageResult:
    """One image of a request: its id, its decoded pixels (H, W, 3) BGR, its detections (class filter and
    ``max_detections`` applied) and its annotations in the requested format."""

    img_id: str | None
    image: np.ndarray
    detections: Detections
    annotations: list[dict]


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
    """

    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler | None = None,
        limits: Limits | None = None,
        index: InstanceIndex | None = None,
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
    def default_options(self) -> wire.RequestOptions:
        """The seed tensorpack container's behaviour: score threshold ``TEST.RESULT_SCORE_THRESH_VIS``, mask
        threshold 0.5, ``TEST.RESULTS_PER_IM`` detections, legacy format (boxes for a model without masks)."""
        return wire.RequestOptions(
            score_threshold=self.inference.vis_score_threshold,
            format="legacy" if self.backend.has_masks else "boxes",
        )

    def parse(
        self, body: bytes, content_type: str | None, query, custom_attributes: str | None = None
    ) -> wire.ParsedRequest:
        """Validate an ``/invocations`` body and its options against this model and server (nothing is decoded
        yet)."""
        request = wire.parse_request(
            body, content_type, query, self.default_options(), self.backend.class_names, self.limits,
            custom_attributes, self.backend.has_masks,
        )
        if self.index is None and any(item.options.neighbours for item in request.images):
            raise SearchUnavailable("neighbours needs an instance index, and this server has none (start it with "
                                    "`serve --index DB`).")
        return request

    def handle(
        self, request: wire.ParsedRequest, deadline: Deadline = NO_DEADLINE, times: StageTimes | None = None
    ) -> Response:
        """Run a parsed request through every stage; the body is the HTTP response. ``times`` collects the stage
        times as they happen (a new one by default)."""
        times = times if times is not None else StageTimes()
        results = self.process(request.images, times, deadline, limit_response=True)
        deadline.check("it was still encoding its answer")
        with times.measure(Stage.ENCODE):
            responses = [
                wire.image_response(result.img_id, result.annotations,
                                    result.detections.image_embedding if item.options.embeddings else None)
                for result, item in zip(results, request.images, strict=True)
            ]
            body = wire.encode_response(responses, request.is_list, self.limits)
        return Response(body, results, times.seconds)

    def process(
        self,
        items: Sequence[wire.ImageRequest],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
        limit_response: bool = False,
    ) -> list[ImageResult]:
        """Every stage but the JSON body: each item's detections and annotations. ``limit_response``: refuse (413)
        annotations that would not fit the response limit as soon as that is known (:meth:`handle`)."""
        images = self.decode(items, times, deadline)
        detections = self.run_model(images, [item.options for item in items], times, deadline)
        with times.measure(Stage.POSTPROCESS):
            detections = [self.select(dets, item.options) for dets, item in zip(detections, items, strict=True)]
        annotations = self.annotate(items, detections, times, deadline, limit_response)
        self.add_search_fields(items, detections, annotations, times, deadline)
        return [
            ImageResult(item.img_id, image, dets, records)
            for item, image, dets, records in zip(items, images, detections, annotations, strict=True)
        ]

    # ------------------------------------------------------------------------------------------ stages
    def predict_options(self, options: wire.RequestOptions) -> PredictOptions:
        """What the graph is asked for. With a class filter it returns at least ``TEST.RESULTS_PER_IM``
        detections, so that the filter sees the full list; ``max_detections`` is applied after the filter."""
        graph_max = options.max_detections
        if options.classes is not None:
            graph_max = max(options.max_detections or 0, self.inference.results_per_image)
        return PredictOptions(options.score_threshold, graph_max, options.embeddings or bool(options.neighbours))

    def decode(
        self, items: Sequence[wire.ImageRequest], times: StageTimes, deadline: Deadline = NO_DEADLINE
    ) -> list[np.ndarray]:
        """The items' images as (H, W, 3) BGR uint8, through the decoding gate, within the request's limits."""
        with times.measure(Stage.DECODE):
            files = [wire.image_bytes(item) for item in items]
            return imaging.decode_images(files, self.limits.max_image_pixels, deadline, self.limits.tiff)

    def select(self, detections: Detections, options: wire.RequestOptions) -> Detections:
        """The class filter, then ``max_detections`` (the graph already applied the score threshold)."""
        return wire.filter_detections(detections, options, self.inference.results_per_image)

    def run_model(
        self,
        images: Sequence[np.ndarray],
        options: Sequence[wire.RequestOptions],
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

    def annotate(
        self,
        items: Sequence[wire.ImageRequest],
        detections: Sequence[Detections],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
        limit_response: bool = False,
    ) -> list[list[dict]]:
        """postprocess (mask pasting at box size) and encode: each image's annotation records in its format.

        One detection at a time, so that memory holds one pasted mask, not all of them (1000 detections of a large
        photo are gigabytes of masks). The response's size is counted as the records are made: its lower bound
        (every record with the smallest mask its format can have) is checked before any mask is pasted, and the
        running total after each record (with ``limit_response``), so a 413 comes before the work it would throw
        away. Small boxes first: a mask's encoding grows with its box's side and its pasting with its area, so an
        answer over the limit is found with the least pasting; the records keep the detections' order. The deadline
        is checked per detection."""
        size = wire.ResponseSize(self.limits) if limit_response else None
        with times.measure(Stage.ENCODE):
            floors = [size.add_floor(dets, item.options) if size else [0] * len(dets)
                      for item, dets in zip(items, detections, strict=True)]
        annotations = []
        for item, dets, floor in zip(items, detections, floors, strict=True):
            records: list[dict] = [{}] * len(dets)
            sides = dets.boxes[:, 2:] - dets.boxes[:, :2]
            for index in np.argsort(sides[:, 0] * sides[:, 1], kind="stable"):
                deadline.check("it was still encoding its answer")
                one = dets.select([index])
                with times.measure(Stage.POSTPROCESS):
                    patches = wire.paste_patches(one, item.options)
                with times.measure(Stage.ENCODE):
                    (records[index],) = wire.encode_annotations(one, item.options, patches)
                    if size is not None:
                        size.add_record(records[index], floor[index])
            annotations.append(records)
        return annotations

    def add_search_fields(
        self,
        items: Sequence[wire.ImageRequest],
        detections: Sequence[Detections],
        annotations: Sequence[list[dict]],
        times: StageTimes,
        deadline: Deadline = NO_DEADLINE,
    ) -> None:
        """search: each instance's nearest indexed instances where asked (``neighbours``, ``same_class``), and the
        instances' embeddings where asked (timed as one stage, zero for requests that ask for neither)."""
        with times.measure(Stage.SEARCH):
            for item, dets, records in zip(items, detections, annotations, strict=True):
                options = item.options
                neighbours = None
                if options.neighbours:
                    deadline.check("it was still searching the index")
                    categories = dets.labels if options.same_class else None
                    neighbours = self.index.search(dets.embeddings, options.neighbours, categories)
                wire.add_search_fields(records, dets, options, neighbours)
