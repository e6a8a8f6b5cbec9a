"""The one inference pipeline on the session's demo backends: stages timed by the caller, options, class filter,
deadlines, batching of a multi-image request, the same answers as the backend called directly, and image files run
one by one (``run_files``)."""

from __future__ import annotations

import json
import threading
import time
import weakref

import cv2
import numpy as np
import pytest

from maskrcnn_serving import pipeline as pipeline_module
from maskrcnn_serving import postprocess, wire
from maskrcnn_serving.backends.base import PredictOptions
from maskrcnn_serving.deadline import Deadline
from maskrcnn_serving.errors import DeadlineExceeded, NotAnImage, SearchNotConfigured, SearchUnavailable
from maskrcnn_serving.pipeline import STAGES, Pipeline, StageTimes
from maskrcnn_serving.request import ImageRequest, RequestOptions


@pytest.fixture(scope="module")
def pipeline(tensorpack_backend):
    pipeline = Pipeline(tensorpack_backend)
    yield pipeline
    pipeline.close()


def request(pipeline, files, **options):
    defaults = pipeline.default_options()
    items = [ImageRequest(str(i), data, wire.parse_options(options, defaults, pipeline.backend.class_names, False))
             for i, data in enumerate(files)]
    return wire.ParsedRequest(items, is_list=len(items) > 1)


def test_every_stage_is_timed_and_they_add_up(pipeline, example_images):
    files = [p.read_bytes() for p in example_images[:2]]
    start = time.perf_counter()
    response = pipeline.handle(request(pipeline, files))
    wall = time.perf_counter() - start
    assert set(response.stages) == set(STAGES)
    assert all(seconds >= 0 for seconds in response.stages.values())
    assert response.stages["model"] > 0 and abs(sum(response.stages.values()) - wall) < 0.05 * wall + 0.005
    answers = json.loads(response.body)
    assert [a["img_id"] for a in answers] == ["0", "1"] and response.detection_count == sum(
        len(a["annotations"]) for a in answers)


def test_answers_equal_the_backend_called_directly(pipeline, tensorpack_backend, example_images):
    data = example_images[0].read_bytes()
    result = pipeline.process(request(pipeline, [data], format="coco").images, StageTimes())[0]
    image = cv2.imread(str(example_images[0]), cv2.IMREAD_COLOR)
    assert np.array_equal(result.image, image)  # the decoding gate gives cv2.imread's pixels
    direct = tensorpack_backend.predict([image], PredictOptions(pipeline.inference.vis_score_threshold))[0]
    np.testing.assert_array_equal(result.detections.boxes, direct.boxes)
    np.testing.assert_array_equal(result.detections.scores, direct.scores)
    assert [a["category_id"] for a in result.annotations] == direct.labels.tolist()


def test_class_filter_asks_the_graph_for_the_full_list(pipeline, example_images):
    limit = pipeline.inference.results_per_image
    assert pipeline.predict_options(RequestOptions(0.3, max_detections=5)) == PredictOptions(0.3, 5)
    filtered = RequestOptions(0.3, max_detections=5, classes=frozenset({1}))
    assert pipeline.predict_options(filtered) == PredictOptions(0.3, limit)
    many = RequestOptions(0.3, max_detections=limit + 50, classes=frozenset({1}))
    assert pipeline.predict_options(many) == PredictOptions(0.3, limit + 50)
    data = example_images[0].read_bytes()
    everything = pipeline.handle(request(pipeline, [data], score_threshold=0.0, format="boxes")).images[0]
    wanted = int(everything.detections.labels[-1])  # a class whose best detection is not in the top 3
    top = pipeline.handle(request(pipeline, [data], score_threshold=0.0, format="boxes", classes=[wanted],
                                  max_detections=3)).images[0]
    assert set(top.detections.labels.tolist()) == {wanted} and len(top.detections) == 3
    expected = everything.detections.scores[everything.detections.labels == wanted][:3]
    np.testing.assert_array_equal(top.detections.scores, expected)


def test_deadline_and_bad_bytes_end_the_request(pipeline, example_images):
    with pytest.raises(DeadlineExceeded, match="decoding"):
        pipeline.handle(request(pipeline, [example_images[0].read_bytes()]), Deadline.after(-1.0))
    with pytest.raises(NotAnImage):
        pipeline.handle(request(pipeline, [b"not an image"]))


def test_a_request_of_several_images_shares_forward_calls(optimized_backend, example_images):
    """The optimized backend batches: the four images of one request (one size bucket) run in one call."""
    files = [cv2.imencode(".png", cv2.resize(cv2.imread(str(p)), (320, 240)))[1].tobytes() for p in example_images]
    pipeline = Pipeline(optimized_backend)
    try:
        response = pipeline.handle(request(pipeline, files, score_threshold=0.0, max_detections=5))
        assert pipeline.scheduler.stats.batches == 1 and pipeline.scheduler.stats.largest_batch == 4
    finally:
        pipeline.close()
    assert [len(r.detections) for r in response.images] == [5, 5, 5, 5]


def test_a_many_image_request_holds_a_bounded_number_of_prepared_images(pipeline, example_images, monkeypatch):
    """Images are prepared as the model takes them: a prepared image (at the test size) is many times a small
    decoded one, so a request of many small images must not hold all of them prepared at once."""
    alive: list[weakref.ref] = []
    held: list[int] = []
    preprocess = pipeline.backend.preprocess

    def counting_preprocess(image):
        held.append(sum(ref() is not None for ref in alive))
        prepared = preprocess(image)
        alive.append(weakref.ref(prepared.resized))
        return prepared

    monkeypatch.setattr(pipeline.backend, "preprocess", counting_preprocess)
    small = cv2.imencode(".png", cv2.resize(cv2.imread(str(example_images[0])), (40, 30)))[1].tobytes()
    response = pipeline.handle(request(pipeline, [small] * 10, format="boxes"))
    assert len(response.images) == 10 and len(held) == 10
    assert max(held) <= pipeline.in_flight() < 10, held
    assert pipeline.backend.preprocess(cv2.imread(str(example_images[0]))).resized.shape[0] > 30


@pytest.mark.parametrize("workers", [False, True], ids=["one thread", "annotation workers"])
@pytest.mark.parametrize("fmt", ["legacy", "coco", "polygon", "boxes"])
def test_masks_are_pasted_and_encoded_one_at_a_time_with_the_same_answer(
    pipeline, example_images, monkeypatch, fmt, workers
):
    """annotate() pastes and encodes detection by detection (memory for one mask), on the caller's thread or, for
    large boxes, on the annotation workers: the records equal those of pasting every mask of the image at once,
    byte for byte, in the same order."""
    if workers:
        if pipeline_module.ANNOTATION_WORKERS < 2:
            pytest.skip("one CPU: the annotation workers are not used")
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_AREA", 0)  # every image counts as large
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_FORMATS", frozenset({"legacy", "coco", "polygon"}))
    data = example_images[1].read_bytes()
    result = pipeline.process(request(pipeline, [data], score_threshold=0.0, format=fmt).images, StageTimes())[0]
    options = wire.parse_options({"format": fmt, "score_threshold": 0.0}, pipeline.default_options(),
                                 pipeline.backend.class_names, False)
    at_once = postprocess.encode_annotations(result.detections, options,
                                             postprocess.paste_for_options(result.detections, options))
    assert len(result.detections) > 20
    assert json.dumps(result.annotations) == json.dumps(at_once)
    sizes, threads = [], set()
    real = postprocess.paste_for_options

    def recorded(dets, opts):
        sizes.append(len(dets))
        threads.add(threading.current_thread().name.startswith("annotate"))
        return real(dets, opts)

    monkeypatch.setattr(postprocess, "paste_for_options", recorded)
    pipeline.process(request(pipeline, [data], score_threshold=0.0, format=fmt).images, StageTimes())
    assert sizes == [1] * len(result.detections)
    assert threads == ({True} if workers and fmt != "boxes" else {False})


@pytest.mark.parametrize("workers", [False, True], ids=["one thread", "annotation workers"])
def test_an_answer_over_the_response_limit_is_refused_before_the_masks_are_pasted(tensorpack_backend, example_images,
                                                                                  monkeypatch, workers):
    """The records without their masks already exceed the limit: 413 before any mask is pasted. Just above that
    floor, the running total refuses the answer part-way, before pasting the rest (with the annotation workers,
    the few they had started ahead)."""
    from maskrcnn_serving.errors import ResponseTooLarge

    if workers:
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_AREA", 0)
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_FORMATS", frozenset({"legacy"}))
    from maskrcnn_serving.settings import Limits

    data = example_images[1].read_bytes()
    pasted = []
    real = postprocess.paste_for_options
    monkeypatch.setattr(postprocess, "paste_for_options", lambda dets, opts: pasted.append(1) or real(dets, opts))
    probe = Pipeline(tensorpack_backend)
    try:
        full = probe.handle(request(probe, [data], score_threshold=0.0, max_detections=200))
    finally:
        probe.close()
    count = len(full.images[0].detections)
    assert count > 20 and len(pasted) == count
    for limit, most in ((2000, 0), (len(full.body) // 2, count - 1)):
        pasted.clear()
        small = Pipeline(tensorpack_backend, limits=Limits(max_response_bytes=limit))
        try:
            with pytest.raises(ResponseTooLarge) as info:
                small.handle(request(small, [data], score_threshold=0.0, max_detections=200))
        finally:
            small.close()
        ahead = 2 * pipeline_module.ANNOTATION_WORKERS if workers and most else 0
        assert len(pasted) <= min(count, most + ahead) and "format=coco" in info.value.message
        if most:
            assert len(pasted) > 0


def test_an_answer_too_large_with_its_search_fields_is_refused_before_the_work_it_would_throw_away(
        pipeline, tensorpack_backend, example_images, monkeypatch, tmp_path):
    """Issue 23, defect 7 (a 413 came after the model, every mask and the search): with embeddings too large for the
    limit, 413 before the search; with neighbours too large, 413 after the search and before any mask is pasted;
    with room for both, the same answer as with no limit."""
    from maskrcnn_serving.errors import ResponseTooLarge
    from maskrcnn_serving.search import database
    from maskrcnn_serving.search.index import InstanceIndex
    from maskrcnn_serving.search.service import SearchService
    from maskrcnn_serving.settings import Limits

    dim = tensorpack_backend.embedding_dim
    index = InstanceIndex.open(str(tmp_path / "instances.db"), dim=dim, image_dim=8, create=True)
    vectors = np.random.default_rng(0).normal(size=(40, dim)).astype(np.float32)
    index.insert_rows([{"vector": (v / np.linalg.norm(v)).tolist(), "image": f"photos/{i}.jpg",
                        "bbox": [1.0, 2.0, 30.5, 40.25], "category": "ring", "category_id": 4, "score": 0.75,
                        "height": 50, "width": 60, "mask": "", "thumbnail": ""} for i, v in enumerate(vectors)])
    searched, pasted = [], []
    search, paste = InstanceIndex.search, postprocess.paste_for_options
    monkeypatch.setattr(InstanceIndex, "search", lambda self, *a, **k: searched.append(1) or search(self, *a, **k))
    monkeypatch.setattr(postprocess, "paste_for_options", lambda dets, opts: pasted.append(1) or paste(dets, opts))
    service = SearchService(index.db, index.collection, dim, 30.0)  # as a server's worker searches it
    assert service.open()
    data = example_images[1].read_bytes()
    options = {"score_threshold": 0.0, "max_detections": 60, "format": "coco", "embeddings": True, "neighbours": 10}

    def run(limit: int | None):
        searched.clear()
        pasted.clear()
        limited = Pipeline(tensorpack_backend, limits=Limits(max_response_bytes=limit or 1 << 30), index=service)
        try:
            return limited.handle(request(limited, [data], **options))
        finally:
            limited.close()

    try:
        full = run(None)
        dets = full.images[0].detections
        assert len(dets) > 20 and len(searched) == 1 and len(pasted) == len(dets)
        assert all(len(record["neighbours"]) == 10 for record in full.images[0].annotations)
        size = wire.ResponseSize(Limits(max_response_bytes=1 << 30))
        floors = size.add_floor(dets, request(pipeline, [data], **options).images[0].options)
        before_search = size.total
        size.add_neighbours(floors, index.search(dets.embeddings, 10))
        after_search = size.total
        assert before_search < after_search < len(full.body)
        for limit, searches, stage in ((before_search - 1, 0, "the search"), (after_search - 1, 1, "the masks")):
            with pytest.raises(ResponseTooLarge, match="at least") as info:
                run(limit)
            assert (len(searched), len(pasted)) == (searches, 0), stage
            assert "format=coco" in info.value.message
        assert run(len(full.body)).body == full.body
    finally:
        service.close()
        index.close()
        database.stop_local_servers()


@pytest.mark.parametrize("workers", [False, True], ids=["one thread", "annotation workers"])
def test_the_deadline_is_checked_between_masks(pipeline, example_images, monkeypatch, workers):
    if workers:
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_AREA", 0)
        monkeypatch.setattr(pipeline_module, "PARALLEL_PASTE_FORMATS", frozenset({"legacy"}))
    data = example_images[1].read_bytes()
    parsed = request(pipeline, [data], score_threshold=0.0, max_detections=100)
    real = postprocess.paste_for_options

    def slow(dets, options):
        time.sleep(0.05)
        return real(dets, options)

    monkeypatch.setattr(postprocess, "paste_for_options", slow)
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="encoding"):
        pipeline.handle(parsed, Deadline.after(0.5))
    assert time.perf_counter() - start < 1.0


def test_run_files_runs_each_file_as_its_own_request_in_order(pipeline, example_images):
    """Paths (read when reached; the path's text is the id) and bytes (no id) give the answers of one-image requests;
    the files are taken one at a time, as the results are; the stage times add up over the files."""
    options = RequestOptions(0.0, max_detections=4, format="coco")
    data = example_images[1].read_bytes()
    taken = []

    def files():
        for file in (example_images[0], data):
            taken.append(file)
            yield file

    times = StageTimes()
    results = pipeline.run_files(files(), options, times)
    first = next(results)
    assert taken == [example_images[0]] and first.img_id == str(example_images[0])
    second = next(results)
    assert taken == [example_images[0], data] and second.img_id is None
    assert next(results, None) is None
    for result, source in ((first, example_images[0].read_bytes()), (second, data)):
        alone = pipeline.process([ImageRequest("x", source, options)], StageTimes())[0]
        assert json.dumps(result.annotations) == json.dumps(alone.annotations) and len(result.annotations) == 4
        assert np.array_equal(result.image, alone.image)
    assert times.seconds["model"] > 0 and set(times.seconds) == set(STAGES)


def test_run_files_names_the_file_it_refuses(pipeline, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(NotAnImage, match=f"^{bad}: "):
        list(pipeline.run_files([bad], pipeline.default_options()))
    with pytest.raises(NotAnImage) as info:
        list(pipeline.run_files([b"not an image"], pipeline.default_options()))
    assert not info.value.message.startswith("None")


def test_neighbours_need_the_pipelines_index(pipeline):
    """Checked before any work: no image is decoded for a request the pipeline cannot answer."""
    parsed = request(pipeline, [b"not an image"], neighbours=3)
    with pytest.raises(SearchNotConfigured, match="serve --index"):
        pipeline.handle(parsed)


def test_neighbours_are_refused_at_once_while_search_is_unavailable(tensorpack_backend, tmp_path):
    """An index whose database does not answer (here: no database process serves the folder, and the service may
    not start one, as in a server's worker): a request for neighbours is 503 before any work (its image is not even
    decoded); one without neighbours is answered."""
    from maskrcnn_serving.search.service import SearchService

    service = SearchService(str(tmp_path / "instances.db"), "instances", tensorpack_backend.embedding_dim, 1.0)
    assert service.open() is False and not service.available
    pipeline = Pipeline(tensorpack_backend, index=service)
    try:
        start = time.perf_counter()
        with pytest.raises(SearchUnavailable) as refused:
            pipeline.handle(request(pipeline, [b"not an image"], neighbours=3))
        assert time.perf_counter() - start < 0.1 and refused.value.status == 503
        png = cv2.imencode(".png", np.full((40, 50, 3), 90, np.uint8))[1].tobytes()
        assert pipeline.handle(request(pipeline, [png])).images[0].img_id == "0"
    finally:
        pipeline.close()
        service.close()


def test_the_pipeline_knows_no_protocol():
    """The HTTP codec (wire.py) is above the pipeline: the pipeline never imports it, even to type its requests."""
    import ast
    from pathlib import Path

    import maskrcnn_serving.pipeline as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names = {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert "maskrcnn_serving.wire" not in imported and "maskrcnn_serving.wire" not in names
