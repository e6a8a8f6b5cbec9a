"""The GPU kernel audit (maskrcnn_serving/gpu_audit.py): the optimized backend's hot path has a GPU kernel for every
op at float32 and float16 (also under XLA), and the audit does see ops that have none."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from maskrcnn_serving import gpu_audit
from maskrcnn_serving.backends.base import load_backend
from maskrcnn_serving.cli import main
from maskrcnn_serving.gpu_audit import audit_backend, audit_graph, find_kernel
from maskrcnn_serving.settings import Settings

# The one op of the optimized graph whose int32 GPU kernel reads device memory on purpose: ``labels = classes + 1``
# after the per-class NMS (the labels leave the graph anyway; the NMS has already waited for its output count).
ALLOWED_DEVICE_TO_HOST = {"AddV2"}


def test_the_installed_tensorflow_lists_gpu_kernels():
    """The audit needs the CUDA build's kernel registry; without it every op would look CPU-only."""
    float32 = tf.float32.as_datatype_enum
    attrs = {"T": tf.compat.v1.AttrValue(type=float32)}
    assert find_kernel("Conv2D", {**attrs, "data_format": tf.compat.v1.AttrValue(s=b"NHWC")}) is not None
    assert find_kernel("NonMaxSuppressionV3", {**attrs, "T_threshold": attrs["T"]}) is not None


@pytest.mark.parametrize(
    ("precision", "xla"),
    [("float32", False), ("float16", False), ("mixed", True)],
    ids=["float32", "float16", "mixed-xla"],
)
def test_optimized_hot_path_has_no_cpu_only_op(demo_model_dir, precision, xla):
    backend = load_backend("optimized", demo_model_dir, Settings(precision=precision, xla=xla), environ={},
                           for_gpu=True)
    assert not backend.network.winograd  # on a GPU cuDNN picks the algorithm
    report = audit_backend(backend, batch_size=2)
    assert report.precision == ("float32" if precision == "float32" else "float16")
    assert report.ops_total > 1000 and report.xla is xla
    assert report.cpu_only == [], [f.to_json() for f in report.cpu_only]
    assert report.xla_uncompilable == [], [f.to_json() for f in report.xla_uncompilable]
    # No device-to-host copy in the middle of the graph (e.g. int32 FPN levels, invert_permutation in RoIAlign).
    assert {f.op for f in report.device_to_host} <= ALLOWED_DEVICE_TO_HOST, report.to_json()["device_to_host"]
    assert report.details == {"batch_size": 2, "winograd": False}  # what shaped the graph, in the JSON too


def test_tensorpack_graph_is_audited_too(tensorpack_backend):
    report = audit_backend(tensorpack_backend)
    assert report.backend == "tensorpack" and report.ops_total > 1000
    assert report.cpu_only == []
    # tensorpack pads the image to a multiple of 32 with float maths cast to int32: one copy docs mention.
    assert {f.op for f in report.device_to_host} <= ALLOWED_DEVICE_TO_HOST | {"Sub"}
    with pytest.raises(ValueError, match="one image per call"):
        audit_backend(tensorpack_backend, batch_size=2)  # its graph takes one image: no other graph to audit


def _nms_graph(dtype: tf.DType):
    @tf.function
    def select(boxes, scores):
        keep = tf.image.non_max_suppression(boxes, scores, max_output_size=10, iou_threshold=0.5)
        return tf.gather(boxes, keep)

    function = select.get_concrete_function(tf.TensorSpec([None, 4], dtype), tf.TensorSpec([None], dtype))
    return function.graph, function.graph.outputs


def test_audit_detects_an_op_without_gpu_kernel():
    """NonMaxSuppressionV3 has a GPU kernel for float32 only: NMS in float16 would run on the CPU."""
    graph, outputs = _nms_graph(tf.float16)
    report = audit_graph(graph, outputs, "tiny", "float16", host_stages={})
    assert not report.clean
    [finding] = report.cpu_only
    assert finding.op == "NonMaxSuppressionV3" and "T=float16" in finding.dtypes and finding.count == 1
    assert finding.where and finding.where[0]  # a place is always given
    graph, outputs = _nms_graph(tf.float32)
    assert audit_graph(graph, outputs, "tiny", "float32", host_stages={}).clean


def test_audit_detects_an_op_xla_cannot_compile_inside_a_nested_function():
    """crop_and_resize (RoIAlign) has no XLA kernel: the compiled function would fail on the GPU."""

    @tf.function(jit_compile=True)
    def crop(image, boxes):
        return tf.image.crop_and_resize(image, boxes, tf.zeros([tf.shape(boxes)[0]], tf.int32), [7, 7])

    @tf.function
    def outer(image, boxes):
        return crop(image * 2.0, boxes) + 1.0

    function = outer.get_concrete_function(tf.TensorSpec([1, 8, 8, 2]), tf.TensorSpec([None, 4]))
    report = audit_graph(function.graph, function.graph.outputs, "tiny", "float32", host_stages={})
    assert report.xla and report.cpu_only == []
    assert [f.op for f in report.xla_uncompilable] == ["CropAndResize"]


def test_inspect_gpu_audit_writes_the_json(demo_model_dir, tmp_path, capsys):
    out = tmp_path / "audit.json"
    code = main(["inspect", "--model-dir", str(demo_model_dir), "--gpu-audit", "--backend", "optimized",
                 "--precision", "float16", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert {"backend", "precision", "ops_total", "cpu_only", "host_by_design"} <= set(document)
    assert (document["backend"], document["precision"], document["cpu_only"]) == ("optimized", "float16", [])
    assert all(set(item) == {"op", "reason"} for item in document["host_by_design"])
    assert any(item["op"] == name for item in document["host_by_design"] for name in gpu_audit.HOST_STAGES)
    assert "no GPU kernel (would run on the CPU): none" in capsys.readouterr().out


def test_inspect_gpu_audit_audits_the_backend_of_the_settings(cli_uses_session_backends, demo_model_dir, monkeypatch,
                                                             tmp_path):
    """Without --backend, the backend the settings name ($MODEL_SERVER_BACKEND, else tensorpack), loaded through
    load_backend (here: the session's)."""
    monkeypatch.delenv("MODEL_SERVER_BACKEND", raising=False)
    out = tmp_path / "audit.json"
    assert main(["inspect", "--model-dir", str(demo_model_dir), "--gpu-audit", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert (document["backend"], document["precision"], document["cpu_only"]) == ("tensorpack", "float32", [])


def test_inspect_gpu_audit_refuses_a_precision_the_backend_does_not_compute_in(demo_model_dir, capsys):
    code = main(["inspect", "--model-dir", str(demo_model_dir), "--gpu-audit", "--backend", "tensorpack",
                 "--precision", "float16"])
    assert code == 2
    assert "the tensorpack backend computes in float32 only, not float16" in capsys.readouterr().err
