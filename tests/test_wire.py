"""The HTTP codec: request parsing, option validation, the answer's JSON body and its size (no model, no HTTP
server)."""

from __future__ import annotations

import base64
import json

import numpy as np
import orjson
import pytest
from assertions import SHAPE_NAMES as NAMES
from assertions import shape_detections

from maskrcnn_serving import wire
from maskrcnn_serving.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from maskrcnn_serving.postprocess import encode_annotations, paste_for_options
from maskrcnn_serving.request import ImageResult, RequestOptions
from maskrcnn_serving.settings import Limits

DEFAULTS = RequestOptions(score_threshold=0.5)
LIMITS = Limits()


def parse(body, content_type="application/json", query=None, custom=None, limits=LIMITS, has_masks=True):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return wire.parse_request(body, content_type, query or {}, DEFAULTS, NAMES, limits, custom, has_masks)


# ------------------------------------------------------------------------------------------------ requests


def test_seed_request_schema():
    parsed = parse({"img_id": 17, "img_data": "aGVsbG8="})
    assert not parsed.is_list
    (item,) = parsed.images
    assert item.img_id == "17"  # echoed as str(img_id), as the seed does
    assert item.file_bytes() == b"hello"  # the base64 is decoded when the pipeline reads the file
    assert item.options == DEFAULTS


def test_list_form_with_per_image_options():
    parsed = parse([{"img_id": "a", "img_data": ""}, {"img_id": "b", "img_data": "", "format": "coco"}])
    assert parsed.is_list
    assert [i.img_id for i in parsed.images] == ["a", "b"]
    assert [i.options.format for i in parsed.images] == ["legacy", "coco"]


def test_raw_image_body_with_query_options():
    parsed = parse(b"\xff\xd8rest", "image/jpeg", {"img_id": "x", "format": "boxes", "max_detections": "3"})
    (item,) = parsed.images
    assert (item.img_id, item.file, item.options.format, item.options.max_detections) == (
        "x", b"\xff\xd8rest", "boxes", 3
    )
    assert parse(b"bytes", "application/x-image").images[0].img_id is None


def test_option_precedence_custom_attributes_query_json():
    body = {"img_id": 1, "img_data": "", "mask_threshold": 0.7}
    parsed = parse(body, query={"mask_threshold": "0.6", "max_detections": "5"},
                   custom="mask_threshold=0.4&max_detections=9&classes=ring,1")
    options = parsed.images[0].options
    assert options.mask_threshold == 0.7 and options.max_detections == 5 and options.classes == frozenset({1, 4})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"score_threshold": 0}, ("score_threshold", 0.0)),
        ({"score_threshold": 1}, ("score_threshold", 1.0)),
        ({"mask_threshold": 0.25}, ("mask_threshold", 0.25)),
        ({"max_detections": 1000}, ("max_detections", 1000)),
        ({"max_detections": 7.0}, ("max_detections", 7)),
        ({"classes": ["circle", 3]}, ("classes", frozenset({1, 3}))),
        ({"classes": "ring"}, ("classes", frozenset({4}))),
        ({"format": "POLYGON"}, ("format", "polygon")),
    ],
)
def test_valid_options(options, expected):
    parsed = parse({"img_id": 1, "img_data": "", **options})
    assert getattr(parsed.images[0].options, expected[0]) == expected[1]


@pytest.mark.parametrize(
    "options",
    [
        {"score_threshold": 1.5}, {"score_threshold": -0.1}, {"score_threshold": "0.5"}, {"score_threshold": True},
        {"score_threshold": None}, {"mask_threshold": 0}, {"mask_threshold": 2}, {"max_detections": 0},
        {"max_detections": 1001}, {"max_detections": 2.5}, {"max_detections": "5"}, {"classes": []},
        {"classes": ["dog"]}, {"classes": [0]}, {"classes": [5]}, {"classes": [True]}, {"classes": {"a": 1}},
        {"format": "png"}, {"format": 3},
    ],
)
def test_bad_option_values_are_400(options):
    with pytest.raises(BadRequest) as info:
        parse({"img_id": 1, "img_data": "", **options})
    assert info.value.status == 400
    assert next(iter(options)) in info.value.message


@pytest.mark.parametrize("query", [{"score_threshold": "high"}, {"max_detections": "1.5"}, {"classes": "cat"}])
def test_bad_query_options_are_400(query):
    with pytest.raises(BadRequest):
        parse(b"x", "image/png", query)


@pytest.mark.parametrize("classes", ["\u00b2", "--1", "-", "1-", "\u0663", "9" * 30, "1_0", " 1 ,\u00b9", "1e0", "0x1"])
def test_class_ids_in_text_are_ascii_integers_else_names(classes):
    """isdigit() accepts "²" and lstrip("-") accepts "--1", which int() refuses: they were 500s. Now a class id in
    text is -?[0-9]{1,18}; anything else is a name, and an unknown name is a 400, whatever the source."""
    for source in ({"query": {"classes": classes}}, {"custom": "classes=" + classes}):
        with pytest.raises(BadRequest, match="classes"):
            parse(b"x", "image/png", **source)
    with pytest.raises(BadRequest, match="classes"):
        parse({"img_id": 1, "img_data": "", "classes": classes})
    assert parse(b"x", "image/png", {"classes": " 3 , ring"}).images[0].options.classes == frozenset({3, 4})


@pytest.mark.parametrize("img_id", ['"\\ud800"', '"a\\udfff"', '{"k": "\\ud800"}'])
def test_img_id_must_be_encodable_text(img_id):
    """A lone surrogate is valid in JSON text but cannot be written back as UTF-8: it failed in the response encoder
    after the model had run (a 500). It is refused while parsing; inside a container it is echoed escaped."""
    body = ('{"img_id": ' + img_id + ', "img_data": ""}').encode()
    if img_id.startswith("{"):
        assert "\\ud800" in parse(body).images[0].img_id
        return
    with pytest.raises(BadRequest) as info:
        parse(body)
    assert info.value.code == "invalid_field" and "img_id" in info.value.message
    with pytest.raises(BadRequest):
        parse(b"x", "image/png", {"img_id": "\ud800"})


def test_mask_formats_need_a_mask_model():
    with pytest.raises(BadRequest, match="format=boxes"):
        parse({"img_id": 1, "img_data": "", "format": "coco"}, has_masks=False)
    assert parse({"img_id": 1, "img_data": "", "format": "boxes"}, has_masks=False).images[0].options.format == "boxes"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[]", "invalid_request"),
        (b'"text"', "invalid_request"),
        (b"[1]", "invalid_request"),
        (b'{"img_data": ""}', "missing_field"),
        (b'{"img_id": 1}', "missing_field"),
        (b'{"img_id": 1, "img_data": 5}', "invalid_field"),
        (b'{"img_id": 1, "img_data": ["a"]}', "invalid_field"),
    ],
)
def test_malformed_json_requests_are_400(body, code):
    with pytest.raises(BadRequest) as info:
        parse(body)
    assert info.value.code == code


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "multipart/form-data; boundary=x", "application/xml"])
def test_unsupported_content_types_are_415(content_type):
    with pytest.raises(UnsupportedMediaType):
        parse(b"{}", content_type)


def test_json_content_type_variants():
    body = {"img_id": 1, "img_data": ""}
    assert parse(body, "application/json; charset=utf-8").images
    assert parse(body, "application/vnd.api+json").images


def test_request_limits():
    small = Limits(max_request_bytes=100, max_images=2)
    with pytest.raises(PayloadTooLarge) as info:
        parse(b"x" * 101, "image/jpeg", limits=small)
    assert info.value.status == 413 and info.value.code == "request_too_large"
    with pytest.raises(PayloadTooLarge) as info:
        parse([{"img_id": i, "img_data": ""} for i in range(3)], limits=small)
    assert info.value.code == "too_many_images"


def test_base64_is_as_lenient_as_the_seed():
    data = bytes(range(256)) * 4
    assert wire.decode_base64(base64.encodebytes(data).decode()) == data  # MIME line breaks, like decodebytes
    assert wire.decode_base64("data:image/png;base64," + base64.b64encode(data).decode()) == data
    with pytest.raises(BadRequest) as info:
        wire.decode_base64("abcde")
    assert info.value.code == "invalid_base64"


# ------------------------------------------------------------------------------------------------ responses


def test_response_size_limit_suggests_smaller_formats():
    responses = [wire.image_response("1", [{"bbox": [0, 0, 1, 1], "segmentation": {"counts": list(range(500))}}])]
    with pytest.raises(PayloadTooLarge) as info:
        wire.encode_response(responses, False, Limits(max_response_bytes=1000))
    assert info.value.code == "response_too_large"
    assert "format=coco" in info.value.message and "max_detections" in info.value.message
    body = wire.encode_response(responses, True, Limits(max_response_bytes=10_000))
    assert json.loads(body)[0]["img_id"] == "1"


def test_the_parsed_request_writes_its_answer_in_its_own_shape():
    """An object for an object, an array for an array; ``image_embedding`` only where the image asked for
    embeddings; no ``img_id`` for a raw body that had none."""
    dets = shape_detections()
    dets.image_embedding = np.array([0.5, 0.25], np.float32)
    items = parse([{"img_id": "a", "img_data": ""}, {"img_id": 7, "img_data": "", "embeddings": True}]).images
    results = [ImageResult(item.img_id, np.zeros((48, 64, 3), np.uint8), dets, [{"bbox": [1, 2, 3, 4]}])
               for item in items]
    answer = json.loads(wire.ParsedRequest(items, is_list=True).encode(results, LIMITS))
    assert answer == [{"img_id": "a", "annotations": [{"bbox": [1, 2, 3, 4]}]},
                      {"img_id": "7", "annotations": [{"bbox": [1, 2, 3, 4]}], "image_embedding": [0.5, 0.25]}]
    raw = parse(b"\xff\xd8", "image/jpeg")
    (result,) = [ImageResult(item.img_id, results[0].image, dets, [{"bbox": [1, 2, 3, 4]}]) for item in raw.images]
    assert json.loads(raw.encode([result], LIMITS)) == {"annotations": [{"bbox": [1, 2, 3, 4]}]}
    with pytest.raises(PayloadTooLarge):
        raw.encode([result], Limits(max_response_bytes=20))


@pytest.mark.parametrize("fmt", ["legacy", "coco", "polygon", "boxes"])
def test_the_response_size_floor_is_never_over_the_real_size(fmt):
    """The floor counts each record with the smallest segmentation of its format, before any mask is pasted; the
    real records then replace their floors. Never over the body's size, so it refuses only what the body's own
    check would, and earlier."""
    dets = shape_detections()
    options = RequestOptions(score_threshold=0.5, format=fmt)
    records = encode_annotations(dets, options, paste_for_options(dets, options))
    body = len(wire.encode_response([wire.image_response(None, records)], False, LIMITS))
    size = wire.ParsedRequest([], is_list=False).response_budget(LIMITS)
    floors = size.add_floor(dets, options)
    assert len(floors) == 3 and 0 < size.total == sum(floors) <= body
    for record, floor in zip(records, floors, strict=True):
        assert len(json.dumps(record, separators=(",", ":"))) >= floor
        size.add_record(record, floor)
    assert size.total <= body < size.total + 40  # the separators and "annotations" are not counted
    tight = wire.ResponseSize(Limits(max_response_bytes=sum(floors) - 1))
    with pytest.raises(PayloadTooLarge, match="at least"):
        tight.add_floor(dets, options)
    if fmt != "boxes":  # a real mask is larger than the smallest one
        running = wire.ResponseSize(Limits(max_response_bytes=sum(floors)))
        floors = running.add_floor(dets, options)
        with pytest.raises(PayloadTooLarge, match="more than"):
            running.add_record(records[0], floors[0])


@pytest.mark.parametrize("fmt", ["legacy", "coco", "polygon", "boxes"])
def test_the_response_size_counts_the_search_fields_before_the_search_and_the_masks(fmt):
    """Issue 23, defect 7: the embeddings (their values are known once the model ran) and an empty neighbour list
    are in the floor, before the search; the neighbours found are counted before any mask is pasted. Still never
    over the real size: the search may find fewer neighbours than asked for (here 0, 1 and 3 of 3)."""
    from maskrcnn_serving.postprocess import add_search_fields
    from maskrcnn_serving.search.index import Neighbour

    dets = shape_detections()
    rng = np.random.default_rng(0)
    dets.embeddings = rng.normal(size=(3, 40)).astype(np.float32)
    dets.image_embedding = rng.normal(size=16).astype(np.float32)
    options = RequestOptions(score_threshold=0.5, format=fmt, embeddings=True, neighbours=3)
    found = [[Neighbour(100 + k, f"images/{k}.jpg", [1.5, 2.0, 30.25, 4.0], "circle", 0.9, 0.125)
              for k in range(count)] for count in (0, 1, 3)]
    records = encode_annotations(dets, options, paste_for_options(dets, options))
    add_search_fields(records, dets, options, found)
    body = len(wire.encode_response([wire.image_response(None, records, dets.image_embedding)], False, LIMITS))
    without_search = wire.ResponseSize(LIMITS)
    plain = without_search.add_floor(dets, RequestOptions(score_threshold=0.5, format=fmt))
    size = wire.ResponseSize(LIMITS)
    floors = size.add_floor(dets, options)
    for floor, bare, embedding in zip(floors, plain, dets.embeddings, strict=True):  # the values, as written
        written = orjson.dumps(embedding, option=orjson.OPT_SERIALIZE_NUMPY)
        assert floor - bare == len(b',"embedding":' + written + b',"neighbours":[]')
    image_embedding = orjson.dumps(dets.image_embedding, option=orjson.OPT_SERIALIZE_NUMPY)
    assert size.total - sum(floors) == len(b'"image_embedding":' + image_embedding)
    before_search = size.total
    floors = size.add_neighbours(floors, found)
    assert size.total > before_search + 2 * len(json.dumps(found[2][0].to_json()))
    for record, floor in zip(records, floors, strict=True):
        assert len(json.dumps(record, separators=(",", ":"), default=lambda a: a.tolist())) >= floor
        size.add_record(record, floor)
    assert size.total <= body < size.total + 40  # the separators and "annotations" are not counted
    with pytest.raises(PayloadTooLarge, match="at least"):  # refused before the search
        wire.ResponseSize(Limits(max_response_bytes=before_search - 1)).add_floor(dets, options)
    tight = wire.ResponseSize(Limits(max_response_bytes=sum(floors) - 1))
    floors = tight.add_floor(dets, options)
    with pytest.raises(PayloadTooLarge, match="at least"):  # refused by the neighbours found, before any mask
        tight.add_neighbours(floors, found)


def test_search_options_from_json_query_and_custom_attributes():
    body = {"img_id": 1, "img_data": "aGk=", "embeddings": True, "neighbours": 5, "same_class": False}
    options = parse(body).images[0].options
    assert (options.embeddings, options.neighbours, options.same_class) == (True, 5, False)
    options = parse(body | {"embeddings": False}, query={"neighbours": "2", "same_class": "yes"}).images[0].options
    assert (options.embeddings, options.neighbours, options.same_class) == (False, 5, False)  # JSON wins
    options = parse(b"\xff\xd8", "image/jpeg", custom="embeddings=1&neighbours=100").images[0].options
    assert options.embeddings is True and options.neighbours == 100
    assert parse({"img_id": 1, "img_data": "aGk="}).images[0].options.neighbours is None


@pytest.mark.parametrize(
    "bad",
    [{"embeddings": "maybe"}, {"embeddings": 1}, {"neighbours": 0}, {"neighbours": 101}, {"neighbours": 2.5},
     {"neighbours": "many"}, {"same_class": None}],
)
def test_bad_search_options_are_400(bad):
    with pytest.raises(BadRequest):
        parse({"img_id": 1, "img_data": "aGk=", **bad})


@pytest.mark.parametrize(("word", "value"), [("on", True), ("OFF", False), (" Yes ", True), ("0", False)])
def test_flag_words_in_text_are_the_settings_words(word, value):
    """Text flags (query, custom attributes) read the words of maskrcnn_serving.booleans, as the settings do;
    JSON flags must be JSON booleans."""
    assert parse(b"x", "image/png", {"embeddings": word}).images[0].options.embeddings is value
    assert parse(b"x", "image/png", custom=f"same_class={word}").images[0].options.same_class is value
    with pytest.raises(BadRequest, match="embeddings must be true or false"):
        parse({"img_id": 1, "img_data": "", "embeddings": word})
    with pytest.raises(BadRequest, match="same_class must be true or false"):
        parse(b"x", "image/png", {"same_class": word + "x"})
