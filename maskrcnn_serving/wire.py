"""The HTTP codec of ``POST /invocations``: a body into the pipeline's requests, its results into a body.

Pure functions of bytes, no Flask, no model: the server (:mod:`maskrcnn_serving.server.app`) parses a body here,
hands the :class:`ParsedRequest` to :meth:`maskrcnn_serving.pipeline.Pipeline.handle`, which runs it (the types are
:mod:`maskrcnn_serving.request`'s) and asks the request to write its answer (:meth:`ParsedRequest.encode`). Every
client mistake raises a :mod:`maskrcnn_serving.errors` class, which fixes the HTTP status.

Requests (see docs/openapi.yaml and the README):

* ``application/json`` object ``{"img_id": any, "img_data": "<base64 of the image file>", <options>...}`` -- the
  seed containers' schema -- or a JSON array of such objects (several images; the response is then an array);
* a raw image body (``image/jpeg``, ``image/png``, ``application/x-image``, ...) for Batch Transform.

Options (``score_threshold``, ``mask_threshold``, ``max_detections``, ``classes``, ``format``) come from, in
increasing precedence: the server defaults, the ``X-Amzn-SageMaker-Custom-Attributes`` header (query-string
syntax, as ``InvokeEndpoint(CustomAttributes=...)`` sends it), the URL query, and the JSON fields of an image.

Answers: the JSON body and the response size limit; :class:`ResponseSize` counts the body's size while the
pipeline makes the records, so that an answer over the limit is refused before the work that would make it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import numpy as np
import orjson

from maskrcnn_serving.booleans import parse_bool
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
from maskrcnn_serving.postprocess import add_search_fields, encode_annotations, neighbour_records
from maskrcnn_serving.request import FORMATS, MASK_FORMATS, ImageRequest, ImageResult, RequestOptions
from maskrcnn_serving.settings import Limits
from maskrcnn_serving.structures import Detections

if TYPE_CHECKING:  # the index (and its database client) is only needed where a server or command opens one
    from maskrcnn_serving.search.index import Neighbour

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
class Base64Image:
    """The base64 text of a JSON request's ``img_data``, decoded when the pipeline reads the file (its decode
    stage, so that the decoding is timed there and a bad text is refused there): a
    :class:`maskrcnn_serving.request.FileSource`."""

    text: str

    def read_bytes(self) -> bytes:
        return decode_base64(self.text)


@dataclass(frozen=True)
class ParsedRequest:
    """The images of one ``/invocations`` body, and how its answer is written: a JSON array when the body was one
    (``is_list``), else one object. The pipeline runs it through :meth:`Pipeline.handle
    <maskrcnn_serving.pipeline.Pipeline.handle>`, which calls :meth:`response_budget` and :meth:`encode`."""

    images: list[ImageRequest]
    is_list: bool

    def response_budget(self, limits: Limits) -> ResponseSize:
        """The running size of this request's answer, held to ``limits.max_response_bytes``."""
        return ResponseSize(limits)

    def encode(self, results: Sequence[ImageResult], limits: Limits) -> bytes:
        """The JSON body of the answer (413 over ``limits.max_response_bytes``); ``results`` in request order."""
        responses = [
            image_response(result.img_id, result.annotations,
                           result.detections.image_embedding if item.options.embeddings else None)
            for result, item in zip(results, self.images, strict=True)
        ]
        return encode_response(responses, self.is_list, limits)


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
    """A JSON boolean, or (text options only) one of the words of :mod:`maskrcnn_serving.booleans`."""
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return parse_bool(value)
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
        raise RequestTooLarge.over_limit(limits.max_request_bytes)
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
        images.append(ImageRequest(_img_id(item["img_id"], where), Base64Image(item["img_data"]), options))
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


# ----------------------------------------------------------------------------------------------- responses


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
    refused (413) before the work that would make it:

    * :meth:`add_floor`, once the detections are known: every record of an image with the smallest segmentation its
      format can have (before any mask is pasted), its ``embedding`` as it will be written (the values are known),
      and an empty ``neighbours`` list (before the search, which may find fewer than asked for); the image's
      ``image_embedding``;
    * :meth:`add_neighbours`, after the search: the neighbour records found, as they will be written (before any
      mask is pasted);
    * :meth:`add_record`: a record's floor replaced by its real size as it is made.

    Never over the final size (separators and ``img_id`` are not counted), so it only refuses answers
    :func:`encode_response` would refuse too.

    It counts JSON bytes, so it lives in the codec; the pipeline only knows its interface
    (:class:`maskrcnn_serving.pipeline.ResponseBudget`) and gets it from the request it runs
    (:meth:`ParsedRequest.response_budget`), so it never imports this module."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0

    def add_floor(self, dets: Detections, options: RequestOptions) -> list[int]:
        """Count the smallest records ``dets`` can have in ``options.format``, with their search fields as far as
        they are known before the search; returns each record's floor."""
        height, width = (int(v) for v in dets.image_hw)
        smallest: Any = None
        if options.format in MASK_FORMATS and dets.has_masks:
            smallest = {"legacy": {"counts": [0], "size": [height, width]},
                        "coco": {"size": [height, width], "counts": ""}}.get(options.format, [])
        records = encode_annotations(dets, options, None)
        for record in records:
            if smallest is not None:
                record["segmentation"] = smallest
        add_search_fields(records, dets, options, [[]] * len(dets) if options.neighbours else None)
        floors = [_record_bytes(record) for record in records]
        image_fields = 0
        if options.embeddings:  # ,"image_embedding":[...] in the image's object, less its comma
            image_fields = _record_bytes({"image_embedding": dets.image_embedding}) - 2
        self.total += sum(floors) + image_fields
        self._check("at least")
        return floors

    def add_neighbours(self, floors: list[int], neighbours: Sequence[Sequence[Neighbour]]) -> list[int]:
        """Count the neighbours found for each record (their floors counted an empty list); returns the new floors."""
        grown = [floor + len(orjson.dumps(neighbour_records(found))) - 2
                 for floor, found in zip(floors, neighbours, strict=True)]
        self.total += sum(grown) - sum(floors)
        self._check("at least")
        return grown

    def add_record(self, record: dict, floor: int) -> None:
        """Replace a record's ``floor`` by its real size."""
        self.total += _record_bytes(record) - floor
        self._check("more than")

    def _check(self, qualifier: str) -> None:
        if self.total > self.limits.max_response_bytes:
            raise _response_too_large(f"{qualifier} {self.total} bytes", self.limits)
