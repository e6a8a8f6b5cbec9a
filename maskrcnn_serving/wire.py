"""The HTTP wire format of ``POST /invocations``: request parsing, option validation, responses.

Pure functions of bytes and :class:`Detections`, no Flask; :class:`maskrcnn_serving.pipeline.Pipeline` calls them
(image bytes are decoded by :mod:`maskrcnn_serving.imaging`). Every client mistake raises a
:mod:`maskrcnn_serving.errors` class, which fixes the HTTP status.

Requests (see docs/openapi.yaml and the README):

* ``application/json`` object ``{"img_id": any, "img_data": "<base64 of the image file>", <options>...}`` -- the
  seed containers' schema -- or a JSON array of such objects (several images; the response is then an array);
* a raw image body (``image/jpeg``, ``image/png``, ``application/x-image``, ...) for Batch Transform.

Options (``score_threshold``, ``mask_threshold``, ``max_detections``, ``classes``, ``format``) come from, in
increasing precedence: the server defaults, the ``X-Amzn-SageMaker-Custom-Attributes`` header (query-string
syntax, as ``InvokeEndpoint(CustomAttributes=...)`` sends it), the URL query, and the JSON fields of an image.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson

from maskrcnn_serving.encoding import coco_rle_of_patch, legacy_rle, polygons_of_patch
from maskrcnn_serving.errors import (
    BadRequest,
    InvalidBase64,
    InvalidField,
    InvalidJson,
    MissingField,
    NotAnImage,
    RequestTooLarge,
    ResponseTooLarge,
    TooManyImages,
    UnsupportedMediaType,
)
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.structures import Detections

FORMATS = ("legacy", "coco", "polygon", "boxes")
MASK_FORMATS = ("legacy", "coco", "polygon")
OPTION_NAMES = ("score_threshold", "mask_threshold", "max_detections", "classes", "format", "embeddings",
                "neighbours", "same_class")
MAX_DETECTIONS_LIMIT = 1000
MAX_NEIGHBOURS = 100
RAW_IMAGE_TYPES = frozenset(
    {
        "image/jpeg", "image/jpg", "image/png", "image/bmp", "image/tiff", "image/webp",
        "application/x-image", "application/octet-stream",
    }
)

@dataclass(frozen=True)
class RequestOptions:
    """Validated per-image options.

    score_threshold: keep detections with score strictly above it (applied in the graph, before per-class NMS).
    mask_threshold: a mask pixel is set where the pasted probability is >= it.
    max_detections: at most this many detections (None: the model's ``TEST.RESULTS_PER_IM``).
    classes: keep only these contiguous class ids (None: all).
    format: one of :data:`FORMATS`.
    embeddings: add each instance's search vector (``embedding``) and the image's (``image_embedding``).
    neighbours: add each instance's this many nearest indexed instances (needs the server's index).
    same_class: search the neighbours among instances of the instance's own class only.
    """

    score_threshold: float
    mask_threshold: float = 0.5
    max_detections: int | None = None
    classes: frozenset[int] | None = None
    format: str = "legacy"
    embeddings: bool = False
    neighbours: int | None = None
    same_class: bool = False


@dataclass(frozen=True)
class ImageRequest:
    """One image of a request: ``img_id`` is echoed as ``str(img_id)`` (None for a raw body without one);
    ``payload`` is base64 text (JSON requests) or the image file bytes (raw bodies)."""

    img_id: str | None
    payload: str | bytes
    options: RequestOptions


@dataclass(frozen=True)
class ParsedRequest:
    images: list[ImageRequest]
    is_list: bool


def mimetype_of(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


# ----------------------------------------------------------------------------------------------- options


def _number(name: str, value: Any, from_text: bool, kind: type) -> float | int:
    expected = "an integer" if kind is int else "a number"
    if from_text:
        try:
            return kind(value)
        except ValueError:
            raise BadRequest(f"{name} must be {expected}, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be {expected}, got {type(value).__name__} {value!r}.")
    if isinstance(value, int) and abs(value) > 2**53:  # float() of a 400-digit JSON integer overflows
        raise BadRequest(f"{name} is out of range: an integer with {len(str(abs(value)))} digits.")
    if kind is int and not (math.isfinite(value) and float(value).is_integer()):
        raise BadRequest(f"{name} must be {expected}, got {value!r}.")
    return kind(value)


# A class id in text options: ASCII digits only (str.isdigit() also accepts "²", which int() refuses), short enough
# for int() (longer strings are names, and unknown).
_CLASS_ID = re.compile(r"-?[0-9]{1,18}")


def _classes(value: Any, from_text: bool, class_names: Sequence[str]) -> frozenset[int]:
    if from_text or isinstance(value, str):
        items: list[Any] = [v.strip() for v in str(value).split(",") if v.strip()]
        items = [int(v) if _CLASS_ID.fullmatch(v) else v for v in items]
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest(f"classes must be a list of class names or ids, got {type(value).__name__}.")
    if not items:
        raise BadRequest("classes must name at least one class.")
    valid = ", ".join(f"{i}={n!r}" for i, n in enumerate(class_names) if i > 0)
    ids = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise BadRequest(f"classes entries must be names or integer ids, got {item!r}.")
        if isinstance(item, int):
            if not 1 <= item < len(class_names):
                raise BadRequest(f"classes: unknown class id {item}; this model has {valid}.")
            ids.add(item)
        else:
            if item not in class_names[1:]:
                raise BadRequest(f"classes: unknown class name {item!r}; this model has {valid}.")
            ids.add(list(class_names).index(item, 1))
    return frozenset(ids)


def parse_options(
    raw: Mapping[str, Any], base: RequestOptions, class_names: Sequence[str], from_text: bool, has_masks: bool = True
) -> RequestOptions:
    """Validate the option fields present in ``raw`` (JSON values, or strings when ``from_text``) over ``base``."""
    updates: dict[str, Any] = {}
    if "score_threshold" in raw:
        value = _number("score_threshold", raw["score_threshold"], from_text, float)
        if not 0.0 <= value <= 1.0:
            raise BadRequest(f"score_threshold must be in [0, 1], got {value}.")
        updates["score_threshold"] = value
    if "mask_threshold" in raw:
        value = _number("mask_threshold", raw["mask_threshold"], from_text, float)
        if not 0.0 < value <= 1.0:
            raise BadRequest(f"mask_threshold must be in (0, 1], got {value}.")
        updates["mask_threshold"] = value
    if "max_detections" in raw:
        value = _number("max_detections", raw["max_detections"], from_text, int)
        if not 1 <= value <= MAX_DETECTIONS_LIMIT:
            raise BadRequest(f"max_detections must be an integer in [1, {MAX_DETECTIONS_LIMIT}], got {value}.")
        updates["max_detections"] = value
    if "classes" in raw:
        updates["classes"] = _classes(raw["classes"], from_text, class_names)
    if "format" in raw:
        value = raw["format"]
        if not isinstance(value, str) or value.lower() not in FORMATS:
            raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {value!r}.")
        if value.lower() in MASK_FORMATS and not has_masks:
            raise BadRequest(f"This model has no mask head; format={value} needs masks. Use format=boxes.")
        updates["format"] = value.lower()
    for name in ("embeddings", "same_class"):
        if name in raw:
            updates[name] = _flag(name, raw[name], from_text)
    if "neighbours" in raw:
        value = _number("neighbours", raw["neighbours"], from_text, int)
        if not 1 <= value <= MAX_NEIGHBOURS:
            raise BadRequest(f"neighbours must be an integer in [1, {MAX_NEIGHBOURS}], got {value}.")
        updates["neighbours"] = value
    return replace(base, **updates) if updates else base


def _flag(name: str, value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise BadRequest(f"{name} must be true or false, got {value!r}.")


# ----------------------------------------------------------------------------------------------- requests


def parse_request(
    body: bytes,
    content_type: str | None,
    query: Mapping[str, str],
    defaults: RequestOptions,
    class_names: Sequence[str],
    limits: Limits,
    custom_attributes: str | None = None,
    has_masks: bool = True,
) -> ParsedRequest:
    """Parse an ``/invocations`` body into images with validated options (no image is decoded yet)."""
    if len(body) > limits.max_request_bytes:
        raise RequestTooLarge(
            f"The request body is over the limit of {limits.max_request_bytes} bytes. Send a smaller "
            "image (or fewer images per request), or raise MODEL_SERVER_MAX_REQUEST_BYTES."
        )
    base = defaults
    if custom_attributes:
        base = parse_options(dict(parse_qsl(custom_attributes)), base, class_names, True, has_masks)
    base = parse_options(query, base, class_names, True, has_masks)
    mimetype = mimetype_of(content_type)
    if _is_json_type(mimetype):
        return _parse_json(body, base, class_names, limits, has_masks)
    if mimetype in RAW_IMAGE_TYPES or mimetype.startswith("image/"):
        if not body:
            raise NotAnImage("The request body is empty; send the image file bytes.")
        img_id = query.get("img_id")
        return ParsedRequest([ImageRequest(None if img_id is None else _img_id(img_id, ""), body, base)], is_list=False)
    raise UnsupportedMediaType(
        f"Content-Type {content_type or '(none)'!r} is not supported. Send application/json "
        '({"img_id": ..., "img_data": "<base64 image>"}) or a raw image body (image/jpeg, image/png, '
        "application/x-image)."
    )


def _parse_json(
    body: bytes, base: RequestOptions, class_names: Sequence[str], limits: Limits, has_masks: bool
) -> ParsedRequest:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"The body is not valid JSON: {exc}.") from None
    except RecursionError:  # hostile nesting ([[[[...]]]]) deeper than the interpreter's recursion limit
        raise InvalidJson("The body is not valid JSON: nested too deeply.") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit conversion limit
        raise InvalidJson(f"The body is not valid JSON: {exc}.") from None
    is_list = isinstance(document, list)
    items = document if is_list else [document]
    if is_list and not items:
        raise BadRequest("The request list is empty; send at least one image.")
    if len(items) > limits.max_images:
        raise TooManyImages(
            f"The request has {len(items)} images; the limit is {limits.max_images} per request "
            "(MODEL_SERVER_MAX_IMAGES)."
        )
    images = []
    for index, item in enumerate(items):
        where = f"item {index}: " if is_list else ""
        if not isinstance(item, dict):
            raise BadRequest(
                f'{where}expected a JSON object {{"img_id": ..., "img_data": "<base64>"}}, got {type(item).__name__}.'
            )
        for key in ("img_id", "img_data"):
            if key not in item:
                raise MissingField(f"{where}missing required field {key!r}.")
        if not isinstance(item["img_data"], str):
            raise InvalidField(f"{where}img_data must be a base64 string, got {type(item['img_data']).__name__}.")
        try:
            options = parse_options(item, base, class_names, False, has_masks)
        except BadRequest as exc:
            raise type(exc)(where + exc.message) from None
        images.append(ImageRequest(_img_id(item["img_id"], where), item["img_data"], options))
    return ParsedRequest(images, is_list)


def _img_id(value: Any, where: str) -> str:
    """``str(img_id)``, which is echoed in the JSON answer: it must be encodable (JSON can carry a lone surrogate,
    "\\ud800", that no UTF-8 encoder writes back)."""
    try:
        text = str(value)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidField(f"{where}img_id is not valid Unicode text (it has a lone surrogate).") from None
    except RecursionError:  # a nested img_id that json.loads accepted but str() cannot walk from deeper in the stack
        raise InvalidField(f"{where}img_id is nested too deeply.") from None
    return text


_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_base64(text: str) -> bytes:
    """The seed's lenient base64 (``base64.decodebytes``: characters outside the alphabet, like newlines, are
    skipped), also accepting a ``data:image/...;base64,`` prefix and the URL-safe alphabet (``-_``, which the
    standard alphabet never contains); wrong padding is a 400."""
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    text = text.translate(_URLSAFE_TO_STANDARD)
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"img_data is not valid base64: {exc}.") from None


def image_bytes(item: ImageRequest) -> bytes:
    """The image file bytes of one request item (base64-decoded for JSON requests)."""
    return decode_base64(item.payload) if isinstance(item.payload, str) else item.payload


# ----------------------------------------------------------------------------------------------- responses


def filter_detections(dets: Detections, options: RequestOptions, default_max: int) -> Detections:
    """Apply the class filter, then ``max_detections`` (the backend already applied the score threshold)."""
    keep = np.arange(len(dets))
    if options.classes is not None:
        keep = keep[np.isin(dets.labels, sorted(options.classes))]
    limit = options.max_detections or default_max
    keep = keep[:limit]
    return dets if len(keep) == len(dets) else dets.select(keep)


def paste_patches(dets: Detections, options: RequestOptions) -> list[tuple[int, int, np.ndarray]] | None:
    """Mask patches ``(y0, x0, patch)`` of every detection for mask formats (pasted at box size, never full
    image size), None for ``boxes``."""
    if options.format not in MASK_FORMATS or not dets.has_masks:
        return None
    return list(dets.mask_patches(options.mask_threshold))


def encode_annotations(
    dets: Detections, options: RequestOptions, patches: list[tuple[int, int, np.ndarray]] | None
) -> list[dict]:
    """The ``annotations`` list of one image in ``options.format``, in descending score order.

    legacy: seed-compatible (docs/seed-containers.md#response): ``bbox`` [int(x1), int(y1), int(x2-x1), int(y2-y1)]
        (truncated), row-major uncompressed ``segmentation``, contiguous ``category_id``, ``category_name``, plus
        ``score``.
    coco: float xywh ``bbox``, ``segmentation`` compressed column-major COCO RLE with ``counts`` a str.
    polygon: float xywh ``bbox``, ``segmentation`` a list of COCO polygons (outer contours, no holes).
    boxes: float xywh ``bbox`` only.
    """
    fmt = options.format
    height, width = dets.image_hw
    annotations = []
    for index in range(len(dets)):
        x1, y1, x2, y2 = (float(v) for v in dets.boxes[index])
        label = int(dets.labels[index])
        if fmt == "legacy":
            bbox: list = [int(x1), int(y1), int(x2 - x1), int(y2 - y1)]
        else:
            bbox = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
        record: dict[str, Any] = {
            "bbox": bbox,
            "category_id": label,
            "category_name": dets.class_names[label],
            "score": round(float(dets.scores[index]), 5),
        }
        if patches is not None:
            y0, x0, patch = patches[index]
            if fmt == "legacy":
                record["segmentation"] = legacy_rle(y0, x0, patch, (height, width))
            elif fmt == "coco":
                record["segmentation"] = coco_rle_of_patch(y0, x0, patch, (height, width))
            else:
                record["segmentation"] = polygons_of_patch(y0, x0, patch)
        annotations.append(record)
    return annotations


def add_search_fields(
    annotations: list[dict], dets: Detections, options: RequestOptions, neighbours: Sequence[Sequence] | None
) -> None:
    """Add ``embedding`` (float32 values, L2-normalised) and ``neighbours`` (each a ``search.index.Neighbour``) to
    each annotation, where the options ask for them."""
    for index, record in enumerate(annotations):
        if options.embeddings:
            record["embedding"] = dets.embeddings[index]
        if neighbours is not None:
            record["neighbours"] = [neighbour.to_json() for neighbour in neighbours[index]]


def image_response(img_id: str | None, annotations: list[dict], image_embedding: np.ndarray | None = None) -> dict:
    """One image's response object: ``{"img_id": str, "annotations": [...]}`` (``img_id`` omitted when the request
    had none, i.e. a raw body without an ``img_id`` query parameter), and ``image_embedding`` when given."""
    response: dict[str, Any] = {} if img_id is None else {"img_id": img_id}
    response["annotations"] = annotations
    if image_embedding is not None:
        response["image_embedding"] = image_embedding
    return response


def encode_response(responses: list[dict], is_list: bool, limits: Limits) -> bytes:
    """Serialize the response and enforce the response size limit (413 with advice when over)."""
    # orjson: compact like separators=(",", ":"), the same shortest round-trip floats, numpy scalars accepted.
    body = orjson.dumps(responses if is_list else responses[0], option=orjson.OPT_SERIALIZE_NUMPY)
    if len(body) > limits.max_response_bytes:
        raise _response_too_large(f"{len(body)} bytes", limits)
    return body


def _response_too_large(size: str, limits: Limits) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"The response would be {size}, over the limit of {limits.max_response_bytes} "
        "(SageMaker real-time endpoints allow 6 MB). Ask for "
        "format=coco (compressed RLE, about 2.5x smaller than legacy on typical masks) or format=boxes (no "
        "masks), a lower max_detections or a higher score_threshold."
    )


def _record_bytes(record: dict) -> int:
    return len(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY))


class ResponseSize:
    """A running lower bound of the response body's size, so that an answer over ``limits.max_response_bytes`` is
    refused (413) before the work that would make it: :meth:`add_floor` counts every record of an image with the
    smallest segmentation its format can have (before any mask is pasted), :meth:`add_record` replaces a record's
    floor by its real size as it is made. Never over the final size (separators and ``img_id`` are not counted),
    so it only refuses answers :func:`encode_response` would refuse too."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0

    def add_floor(self, dets: Detections, options: RequestOptions) -> list[int]:
        """Count the smallest records ``dets`` can have in ``options.format``; returns each record's floor."""
        height, width = (int(v) for v in dets.image_hw)
        smallest: Any = None
        if options.format in MASK_FORMATS and dets.has_masks:
            smallest = {"legacy": {"counts": [0], "size": [height, width]},
                        "coco": {"size": [height, width], "counts": ""}}.get(options.format, [])
        floors = []
        for record in encode_annotations(dets, options, None):
            if smallest is not None:
                record["segmentation"] = smallest
            floors.append(_record_bytes(record))
        self.total += sum(floors)
        self._check("at least")
        return floors

    def add_record(self, record: dict, floor: int) -> None:
        """Replace a record's ``floor`` by its real size."""
        self.total += _record_bytes(record) - floor
        self._check("more than")

    def _check(self, qualifier: str) -> None:
        if self.total > self.limits.max_response_bytes:
            raise _response_too_large(f"{qualifier} {self.total} bytes", self.limits)
