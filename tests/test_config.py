"""Config resolution: defaults < config.json < RESNET_ARCH < CONFIG__ env; strict keys and types; no eval."""

import json

import pytest

from maskrcnn_serving.config import load_config, parse_env_value
from maskrcnn_serving.errors import ModelLoadError


def write_config(tmp_path, values):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return tmp_path


def test_defaults_and_finalized_max_size():
    cfg = load_config(None, {})
    assert cfg["PREPROC.TEST_SHORT_EDGE_SIZE"] == 800
    assert cfg.inference().max_size == 1344.0  # tensorpack rounds 1333 up to a multiple of 32
    assert cfg["TEST.RESULT_SCORE_THRESH"] == 0.05
    assert cfg["BACKBONE.RESNET_NUM_BLOCKS"] == [3, 4, 6, 3]
    assert cfg.explicit == frozenset()


def test_precedence_config_json_then_resnet_arch_then_config_env(tmp_path):
    write_config(
        tmp_path, {"PREPROC.MAX_SIZE": 576, "TEST.RESULTS_PER_IM": 50, "BACKBONE.RESNET_NUM_BLOCKS": [1, 1, 1, 1]}
    )
    env = {"CONFIG__TEST__RESULTS_PER_IM": "7", "RESNET_ARCH": "resnet101"}
    cfg = load_config(tmp_path, env)
    assert cfg["PREPROC.MAX_SIZE"] == 576
    assert cfg["TEST.RESULTS_PER_IM"] == 7
    assert cfg["BACKBONE.RESNET_NUM_BLOCKS"] == [3, 4, 23, 3]
    assert {"PREPROC.MAX_SIZE", "TEST.RESULTS_PER_IM", "BACKBONE.RESNET_NUM_BLOCKS"} <= cfg.explicit
    env["CONFIG__BACKBONE__RESNET_NUM_BLOCKS"] = "[3, 4, 6, 3]"  # CONFIG__ wins over RESNET_ARCH, as in the seed
    assert load_config(tmp_path, env)["BACKBONE.RESNET_NUM_BLOCKS"] == [3, 4, 6, 3]


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    write_config(tmp_path, {"TEST.RESULT_SCORE_TRESH": 0.3})
    with pytest.raises(ModelLoadError, match=r"Unknown config key 'TEST.RESULT_SCORE_TRESH'.*TEST.RESULT_SCORE_THRESH"):
        load_config(tmp_path, {})
    with pytest.raises(ModelLoadError, match="CONFIG__NOPE__KEY"):
        load_config(None, {"CONFIG__NOPE__KEY": "1"})


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="TEST.RESULTS_PER_IM.*expected"):
        load_config(None, {"CONFIG__TEST__RESULTS_PER_IM": "'many'"})
    write_config(tmp_path, {"MRCNN.ACCURATE_PASTE": 1})
    with pytest.raises(ModelLoadError, match="MRCNN.ACCURATE_PASTE"):
        load_config(tmp_path, {})


def test_env_values_are_literals_never_code(tmp_path):
    assert parse_env_value("0.3") == 0.3
    assert parse_env_value("[1, 2]") == [1, 2]
    assert parse_env_value("(0.5, 1.0)") == (0.5, 1.0)
    assert parse_env_value("True") is True
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert parse_env_value(code) == code  # kept as a plain string ...
    with pytest.raises(ModelLoadError):
        load_config(None, {"CONFIG__TEST__RESULT_SCORE_THRESH": code})  # ... which then fails the type check
    assert not marker.exists()
    assert load_config(None, {"CONFIG__FPN__PROPOSAL_MODE": "Level"})["FPN.PROPOSAL_MODE"] == "Level"


def test_resnet_arch_values():
    assert load_config(None, {"RESNET_ARCH": "resnet50"})["BACKBONE.RESNET_NUM_BLOCKS"] == [3, 4, 6, 3]
    with pytest.raises(ModelLoadError, match="RESNET_ARCH='resnet152'"):
        load_config(None, {"RESNET_ARCH": "resnet152"})


def test_aws_samples_aliases_and_training_keys(tmp_path):
    write_config(tmp_path, {"FPN.BOXCLASS_FC_HEAD_DIM": 512, "TRAIN.BATCH_SIZE_PER_GPU": 4, "TRAIN.LR_SCHEDULE": "2x"})
    cfg = load_config(tmp_path, {})
    assert cfg["FPN.FRCNN_FC_HEAD_DIM"] == 512


@pytest.mark.parametrize(
    "key, value",
    [("BACKBONE.NORM", "GN"), ("FPN.CASCADE", True), ("MODE_FPN", False), ("SERVING.FC6_ROW_ORDER", "hwc")],
)
def test_unsupported_values_are_refused(tmp_path, key, value):
    write_config(tmp_path, {key: value})
    with pytest.raises(ModelLoadError, match="not supported"):
        load_config(tmp_path, {})


def test_config_json_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        load_config(tmp_path, {})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_config(tmp_path, {})
