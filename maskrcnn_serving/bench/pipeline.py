"""The server's path measured stage by stage, in-process: encoded image bytes in, response JSON bytes out.

It calls exactly what ``POST /invocations`` calls (:mod:`maskrcnn_serving.wire` and ``Backend.predict``), minus
HTTP, with finer stage boundaries (seconds per call):

    decode       image file bytes -> BGR uint8              (wire.decode_image)
    preprocess   resize, input preparation                   (reported by the backend through timing.stage)
    graph        the rest of the backend call: the network, NMS, boxes back to the original frame
    paste        28x28 mask probabilities -> mask patches    (wire.filter_detections + wire.paste_patches)
    encode       patches and boxes -> response records       (wire.encode_annotations: RLE, bbox, class)
    json         records -> JSON bytes                        (wire.encode_response)

The ``seed`` encoder replaces the last three stages by the seed containers' response path (full-size masks and the
``groupby`` RLE of spec-facts A.7) as the baseline of comparisons.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from maskrcnn_serving import wire
from maskrcnn_serving.backends.base import Backend, PredictOptions
from maskrcnn_serving.bench.seed_rle import seed_binary_mask_to_rle
from maskrcnn_serving.structures import Detections
from maskrcnn_serving.timing import collect_stages, stage

STAGES: tuple[str, ...] = ("decode", "preprocess", "graph", "paste", "encode", "json")
ENCODERS: tuple[str, ...] = (*wire.FORMATS, "seed")
DEFAULT_ENCODER = "legacy"  # the server's default response format
# The benchmark measures the work, so it lifts the server's size limits; responses over the server's default
# response limit are reported (``over_response_limit``) instead of refused.
UNLIMITED = wire.Limits(
    max_request_bytes=1 << 62, max_response_bytes=1 << 62, max_image_pixels=1 << 62, max_images=1 << 30
)


def encode_seed_response(detections: Sequence[Detections], img_ids: Sequence[str]) -> bytes:
    """The seed containers' response (spec-facts A.6-A.8): full-size masks, int-truncated xywh bbox, no score,
    row-major RLE by ``groupby`` over every pixel of every mask. Stages: paste, encode, json."""
    responses = []
    for dets, img_id in zip(detections, img_ids, strict=True):
        with stage("paste"):
            masks = dets.masks(0.5)
        with stage("encode"):
            annotations = []
            for box, label, mask in zip(dets.boxes.tolist(), dets.labels.tolist(), masks, strict=True):
                annotations.append({
                    "bbox": [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])],
                    "category_id": int(label),
                    "category_name": dets.class_names[int(label)],
                    "segmentation": seed_binary_mask_to_rle(mask),
                })
            responses.append({"img_id": img_id, "annotations": annotations})
    with stage("json"):
        return json.dumps(responses if len(responses) > 1 else responses[0]).encode()


@dataclass
class CallResult:
    """One timed pipeline call: wall seconds, seconds per stage, the response body, detections per image."""

    seconds: float
    stages: dict[str, float]
    body: bytes
    detections: list[int]

    @property
    def images(self) -> int:
        return len(self.detections)


class Pipeline:
    """One serving configuration: a loaded backend, the request options and a response format.

    ``run(payloads)`` is one request of ``len(payloads)`` images (a list request when there are several): decode
    all, one backend call for the batch, then one response. A fixed detection count is obtained with
    ``score_threshold=0`` and ``max_detections=N``.
    """

    def __init__(
        self,
        backend: Backend,
        score_threshold: float | None = 0.0,
        max_detections: int | None = 100,
        encoder: str = DEFAULT_ENCODER,
        mask_threshold: float = 0.5,
    ) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        config = backend.bundle.config
        self.backend = backend
        self.encoder = encoder
        self.predict_options = PredictOptions(score_threshold, max_detections)
        self.default_max = int(config["TEST.RESULTS_PER_IM"])
        self.request_options = wire.RequestOptions(
            score_threshold=config["TEST.RESULT_SCORE_THRESH"] if score_threshold is None else score_threshold,
            mask_threshold=mask_threshold,
            max_detections=max_detections,
            format="legacy" if encoder == "seed" else encoder,
        )

    def run(self, payloads: Sequence[bytes]) -> CallResult:
        img_ids = [f"image-{i}" for i in range(len(payloads))]
        with collect_stages() as stages:
            start = time.perf_counter()
            with stage("decode"):
                images = [wire.decode_image(data, UNLIMITED.max_image_pixels) for data in payloads]
            preprocess_before = stages.get("preprocess", 0.0)
            model_start = time.perf_counter()
            detections = self.backend.predict(images, self.predict_options)
            model_seconds = time.perf_counter() - model_start
            stages["graph"] = model_seconds - (stages.get("preprocess", 0.0) - preprocess_before)
            if self.encoder == "seed":
                body = encode_seed_response(detections, img_ids)
            else:
                body = self._encode(detections, img_ids)
            seconds = time.perf_counter() - start
        return CallResult(seconds, dict(stages), body, [len(d) for d in detections])

    def _encode(self, detections: Sequence[Detections], img_ids: Sequence[str]) -> bytes:
        options = self.request_options
        with stage("paste"):
            selected = [wire.filter_detections(d, options, self.default_max) for d in detections]
            patches = [wire.paste_patches(d, options) for d in selected]
        with stage("encode"):
            responses = [
                wire.image_response(img_id, wire.encode_annotations(d, options, p))
                for img_id, d, p in zip(img_ids, selected, patches, strict=True)
            ]
        with stage("json"):
            return wire.encode_response(responses, len(responses) > 1, UNLIMITED)

