"""One benchmark configuration: the serving pipeline with fixed request options, timed request by request.

Each call is one ``/invocations`` request of encoded images, minus HTTP: the pipeline's image requests made from
the payload bytes, run by :meth:`maskrcnn_serving.pipeline.Pipeline.handle` exactly as the server runs them, with
the answer written by the server's codec (:class:`maskrcnn_serving.wire.ParsedRequest`: the JSON body is part of
the encode stage). It reports the pipeline's own stage times (decode, preprocess, queue, model, postprocess,
encode). A fixed detection count is obtained with ``score_threshold=0`` and ``max_detections=N``.

The ``seed`` encoder replaces the last two stages by the seed containers' response path (full-size masks and the
``groupby`` RLE of docs/seed-containers.md#legacy-rle) as the baseline of comparisons.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from maskrcnn_serving import wire
from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.pipeline import Pipeline, Stage, StageTimes
from maskrcnn_serving.postprocess import full_masks
from maskrcnn_serving.request import FORMATS, ImageRequest, RequestOptions
from maskrcnn_serving.structures import Detections

ENCODERS: tuple[str, ...] = (*FORMATS, "seed")
DEFAULT_ENCODER = "legacy"  # the server's default response format


def encode_seed_response(detections: Sequence[Detections], img_ids: Sequence[str], times: StageTimes) -> bytes:
    """The seed containers' response (docs/seed-containers.md#response): full-size masks (postprocess),
    int-truncated xywh bbox, no score, row-major RLE by ``groupby`` over every pixel of every mask, ``json.dumps``
    (encode)."""
    responses = []
    for dets, img_id in zip(detections, img_ids, strict=True):
        with times.measure(Stage.POSTPROCESS):
            masks = full_masks(dets, 0.5)
        with times.measure(Stage.ENCODE):
            annotations = []
            for box, label, mask in zip(dets.boxes.tolist(), dets.labels.tolist(), masks, strict=True):
                annotations.append({
                    "bbox": [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])],
                    "category_id": int(label),
                    "category_name": dets.class_names[int(label)],
                    "segmentation": seed_binary_mask_to_rle(mask),
                })
            responses.append({"img_id": img_id, "annotations": annotations})
    with times.measure(Stage.ENCODE):
        return json.dumps(responses if len(responses) > 1 else responses[0]).encode()


@dataclass
class CallResult:
    """One timed request: wall seconds, seconds per stage, the response body, detections per image."""

    seconds: float
    stages: dict[str, float]
    body: bytes
    detections: list[int]

    @property
    def images(self) -> int:
        return len(self.detections)


class Workload:
    """Requests of the same options through one pipeline (``encoder``: a response format, or ``seed``)."""

    def __init__(
        self,
        pipeline: Pipeline,
        score_threshold: float | None = 0.0,
        max_detections: int | None = 100,
        encoder: str = DEFAULT_ENCODER,
        mask_threshold: float = 0.5,
    ) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        self.pipeline = pipeline
        self.encoder = encoder
        self.options = RequestOptions(
            score_threshold=pipeline.inference.score_threshold if score_threshold is None else score_threshold,
            mask_threshold=mask_threshold,
            max_detections=max_detections,
            format="legacy" if encoder == "seed" else encoder,
        )

    @property
    def backend(self):
        return self.pipeline.backend

    def run(self, payloads: Sequence[bytes]) -> CallResult:
        """One request holding ``payloads`` (encoded image files; a list request when there are several)."""
        items = [ImageRequest(f"image-{i}", data, self.options) for i, data in enumerate(payloads)]
        times = StageTimes()
        start = time.perf_counter()
        if self.encoder == "seed":
            images = self.pipeline.decode(items, times)
            detections = self.pipeline.run_model(images, [item.options for item in items], times)
            body = encode_seed_response(detections, [item.img_id for item in items], times)
            counts = [len(d) for d in detections]
        else:
            response = self.pipeline.handle(wire.ParsedRequest(items, is_list=len(items) > 1), times=times)
            body, counts = response.body, [len(r.detections) for r in response.images]
        return CallResult(time.perf_counter() - start, dict(times.seconds), body, counts)
