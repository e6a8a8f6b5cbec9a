"""Checkpoint discovery, reading, architecture detection and every strict-load failure."""

import json

import numpy as np
import pytest
from checkpoint_factory import (
    R50_BLOCKS,
    R101_BLOCKS,
    random_weights,
    small_architecture,
    write_npz,
    write_tf_checkpoint,
)

from maskrcnn_serving.checkpoint import expected_variables, find_checkpoint, is_training_name
from maskrcnn_serving.errors import ModelLoadError
from maskrcnn_serving.model_dir import load_model_dir
from maskrcnn_serving.settings import Settings


def zero_weights(arch, dtype=np.float32):
    """Cheap weights with the right names and shapes (values do not matter for loading checks)."""
    return {name: np.zeros(shape, dtype) for name, shape in expected_variables(arch).items()}


@pytest.fixture(scope="module", params=["R50", "R101"])
def resnet_weights(request):
    blocks = R50_BLOCKS if request.param == "R50" else R101_BLOCKS
    arch = small_architecture(blocks=blocks, classes=80)
    return request.param, arch, zero_weights(arch)


def test_full_size_variable_lists_match_tensorpack():
    """Counts of docs/model-conventions.md#checkpoint-variables: 307 variables / 44,453,556 parameters for R50,
    562 / 63,497,908 for R101."""
    for blocks, count, params in ((R50_BLOCKS, 307, 44_453_556), (R101_BLOCKS, 562, 63_497_908)):
        arch = small_architecture(blocks=blocks, classes=80)
        arch = type(arch)(blocks, 80, 256, 1024, 256)
        shapes = expected_variables(arch)
        assert len(shapes) == count
        assert sum(int(np.prod(s)) for s in shapes.values()) == params
    assert list(expected_variables(arch))[:2] == ["conv0/W", "conv0/bn/gamma"]
    assert expected_variables(arch)["fastrcnn/fc6/W"] == (12544, 1024)


def test_detects_architecture_from_tf_checkpoint(tmp_path, resnet_weights):
    name, arch, weights = resnet_weights
    training_extras = {
        "global_step": np.array(1000, np.int64),
        "learning_rate": np.array(0.01, np.float32),
        "fpn/lateral_1x1_c2/W/Momentum": np.zeros((1, 1, 256, 16), np.float32),
        "group1/block0/conv1/W/AccumGrad": np.zeros((1, 1, 256, 128), np.float32),
    }
    write_tf_checkpoint(tmp_path, weights, step=5, extra=training_extras)
    bundle = load_model_dir(tmp_path, environ={"RESNET_ARCH": "resnet50" if name == "R50" else "resnet101"})
    assert bundle.architecture == arch
    assert bundle.class_names[1] == "person" and len(bundle.class_names) == 81  # 80 classes -> COCO names
    assert set(bundle.weights) == set(expected_variables(arch))
    assert bundle.checkpoint_path.name == "model-5"


def test_detects_architecture_from_npz_float16(tmp_path, resnet_weights):
    name, arch, weights = resnet_weights
    write_npz(tmp_path / "model.npz", {k: v.astype(np.float16) for k, v in weights.items()}, with_suffix=False)
    bundle = load_model_dir(tmp_path, environ={})
    assert bundle.architecture.resnet_num_blocks == (R50_BLOCKS if name == "R50" else R101_BLOCKS)
    assert all(v.dtype == np.float32 for v in bundle.weights.values())


def test_npz_keys_with_and_without_suffix_give_the_same_weights(tmp_path):
    arch = small_architecture()
    weights = random_weights(arch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_npz(tmp_path / "a" / "model.npz", weights, with_suffix=True)
    write_npz(tmp_path / "b" / "model.npz", weights, with_suffix=False)
    a, b = load_model_dir(tmp_path / "a", environ={}), load_model_dir(tmp_path / "b", environ={})
    assert a.architecture == b.architecture == arch
    for key in weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key])
    assert a.class_names == ("BG", "class_1", "class_2", "class_3")


def test_checkpoint_choice_is_numeric_or_named_by_the_checkpoint_file(tmp_path):
    for step in (90000, 180000, 5):
        (tmp_path / f"model-{step}.index").write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "model-180000"  # the seed picked model-90000 (string order)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model-5"\nall_model_checkpoint_paths: "model-5"\n')
    assert find_checkpoint(tmp_path).name == "model-5"
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/opt/ml/model/model-90000"\n')
    assert find_checkpoint(tmp_path).name == "model-90000"  # absolute path from the training machine
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model-7"\n')
    with pytest.raises(ModelLoadError, match="model-7"):
        find_checkpoint(tmp_path)


def test_missing_directory_or_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_dir(tmp_path / "nope", environ={})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="No checkpoint in"):
        load_model_dir(tmp_path, environ={})
    for name in ("a.npz", "b.npz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several .npz"):
        load_model_dir(tmp_path, environ={})


def test_truncated_or_corrupt_files(tmp_path):
    arch = small_architecture()
    path = write_npz(tmp_path / "model.npz", random_weights(arch))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="Cannot read checkpoint"):
        load_model_dir(tmp_path, environ={})
    path.unlink()
    prefix = write_tf_checkpoint(tmp_path, random_weights(arch))
    data = next(tmp_path.glob("model-0.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="Cannot read TF checkpoint"):
        load_model_dir(tmp_path, environ={})
    assert prefix.name == "model-0"


@pytest.fixture
def small_dir(tmp_path):
    arch = small_architecture()
    weights = random_weights(arch)
    return tmp_path, arch, weights


def test_missing_variable_is_named(small_dir):
    tmp_path, _, weights = small_dir
    del weights["group2/block0/conv2/bn/variance/EMA"]
    write_npz(tmp_path / "model.npz", weights)
    with pytest.raises(ModelLoadError, match=r"missing 1 variable\(s\): group2/block0/conv2/bn/variance/EMA"):
        load_model_dir(tmp_path, environ={})


def test_mismatched_shape_is_named(small_dir):
    tmp_path, _, weights = small_dir
    weights["maskrcnn/fcn1/W"] = np.zeros((3, 3, 16, 17), np.float32)
    write_npz(tmp_path / "model.npz", weights)
    expected = r"wrong shape: maskrcnn/fcn1/W \[3, 3, 16, 17\] \(expected \[3, 3, 16, 16\]\)"
    with pytest.raises(ModelLoadError, match=expected):
        load_model_dir(tmp_path, environ={})


def test_unexpected_model_variables_are_refused(small_dir):
    tmp_path, _, weights = small_dir
    weights["cascade_rcnn_stage2/head/fc6/W"] = np.zeros((784, 32), np.float32)
    write_npz(tmp_path / "model.npz", weights)
    with pytest.raises(ModelLoadError, match="does not use.*cascade_rcnn_stage2/head/fc6/W"):
        load_model_dir(tmp_path, environ={})


def test_not_a_maskrcnn_checkpoint(tmp_path):
    write_npz(tmp_path / "model.npz", {"dense/kernel": np.zeros((3, 3), np.float32)})
    with pytest.raises(ModelLoadError, match="no variable 'group0/block0/conv1/W'"):
        load_model_dir(tmp_path, environ={})


def test_resnet_arch_contradicting_the_checkpoint(tmp_path):
    arch = small_architecture(blocks=R101_BLOCKS)
    write_npz(tmp_path / "model.npz", zero_weights(arch))
    expected = r"RESNET_NUM_BLOCKS=\[3, 4, 6, 3\].*contradicts.*\[3, 4, 23, 3\].*resnet101"
    with pytest.raises(ModelLoadError, match=expected):
        load_model_dir(tmp_path, environ={"RESNET_ARCH": "resnet50"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("BACKBONE.RESNET_NUM_BLOCKS", [3, 4, 6, 3], "RESNET_NUM_BLOCKS"),
        ("FPN.NUM_CHANNEL", 256, "FPN.NUM_CHANNEL=256"),
        ("FPN.FRCNN_FC_HEAD_DIM", 1024, "FPN.FRCNN_FC_HEAD_DIM=1024"),
        ("MRCNN.HEAD_DIM", 256, "MRCNN.HEAD_DIM=256"),
        ("MODE_MASK", False, "MODE_MASK=False"),
        ("DATA.CLASS_NAMES", ["BG", "a", "b"], "DATA.CLASS_NAMES has 3 entries but the checkpoint has 3 classes"),
    ],
)
def test_config_contradicting_the_checkpoint(small_dir, key, value, message):
    tmp_path, _, weights = small_dir
    write_npz(tmp_path / "model.npz", weights)
    (tmp_path / "config.json").write_text(json.dumps({key: value}))
    with pytest.raises(ModelLoadError, match=message):
        load_model_dir(tmp_path, environ={})


def test_training_names():
    for name in ("global_step", "learning_rate", "conv0/W/Momentum", "fpn/x/W/Adam_1", "EMA/loss", "a/EMA/b",
                 "AccumGrad/counter", "x/W/AccumGrad", "apply_gradients/x"):
        assert is_training_name(name), name
    for name in ("conv0/bn/mean/EMA", "group0/block0/conv1/bn/variance/EMA", "fastrcnn/fc6/W"):
        assert not is_training_name(name), name


def test_sm_model_dir_is_the_default(small_dir):
    tmp_path, arch, weights = small_dir
    write_npz(tmp_path / "model.npz", weights)
    assert load_model_dir(Settings.from_env({"SM_MODEL_DIR": str(tmp_path)}).model_dir,
                          environ={}).architecture == arch
