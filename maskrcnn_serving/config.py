"""Tensorpack-compatible model configuration.

A model directory may hold a ``config.json`` whose keys are tensorpack's dotted config names
(``"PREPROC.MAX_SIZE": 576``). Precedence, lowest first:

1. tensorpack's defaults (``examples/FasterRCNN/config.py`` at the commit the SageMaker containers pin),
2. ``config.json`` in the model directory,
3. ``RESNET_ARCH`` (``resnet50`` | ``resnet101``), then ``CONFIG__SECTION__KEY=value`` environment variables,
   whose values are parsed as JSON or Python literals (never ``eval``).

Unknown keys and values of the wrong type are errors. Keys that only matter for training are accepted (a
``config.json`` is often copied from a training run) and have no effect.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrcnn_serving.errors import ModelLoadError

CONFIG_FILE_NAME = "config.json"
ENV_PREFIX = "CONFIG__"

RESNET_ARCHS: dict[str, list[int]] = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}

# fc6 row order of the checkpoint: tensorpack and aws-samples TF1 flatten 7x7 RoI features channel-first
# (row = c*49 + y*7 + x); aws-samples TF2 flattens them channel-last (row = (y*7 + x)*C + c).
FC6_CHANNEL_FIRST = "channel_first"
FC6_CHANNEL_LAST = "channel_last"

_ANY = object()  # marks a default whose type is not checked (tensorpack uses None for "decide later")

# tensorpack's defaults. Inference reads the first group; the second group is training-only.
DEFAULTS: dict[str, Any] = {
    "MODE_MASK": True,
    "MODE_FPN": True,
    "DATA.CLASS_NAMES": [],
    "DATA.NUM_CATEGORY": 0,
    "BACKBONE.RESNET_NUM_BLOCKS": [3, 4, 6, 3],
    "BACKBONE.NORM": "FreezeBN",
    "BACKBONE.TF_PAD_MODE": False,
    "BACKBONE.STRIDE_1X1": False,
    "PREPROC.TEST_SHORT_EDGE_SIZE": 800,
    "PREPROC.MAX_SIZE": 1333,
    "PREPROC.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "PREPROC.PIXEL_STD": [58.395, 57.12, 57.375],
    "RPN.ANCHOR_SIZES": [32, 64, 128, 256, 512],
    "RPN.ANCHOR_RATIOS": [0.5, 1.0, 2.0],
    "RPN.MIN_SIZE": 0,
    "RPN.PROPOSAL_NMS_THRESH": 0.7,
    "RPN.TEST_PER_LEVEL_NMS_TOPK": 1000,
    "FRCNN.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "FPN.ANCHOR_STRIDES": [4, 8, 16, 32, 64],
    "FPN.PROPOSAL_MODE": "Level",
    "FPN.NUM_CHANNEL": 256,
    "FPN.NORM": "None",
    "FPN.RESOLUTION_REQUIREMENT": 32,
    "FPN.FRCNN_HEAD_FUNC": "fastrcnn_2fc_head",
    "FPN.FRCNN_FC_HEAD_DIM": 1024,
    "FPN.MRCNN_HEAD_FUNC": "maskrcnn_up4conv_head",
    "FPN.CASCADE": False,
    "MRCNN.HEAD_DIM": 256,
    "MRCNN.ACCURATE_PASTE": True,
    "TEST.FRCNN_NMS_THRESH": 0.5,
    "TEST.RESULT_SCORE_THRESH": 0.05,
    "TEST.RESULT_SCORE_THRESH_VIS": 0.5,
    "TEST.RESULTS_PER_IM": 100,
    # This project's own key: the fc6 row order of the checkpoint (see FC6_* above).
    "SERVING.FC6_ROW_ORDER": FC6_CHANNEL_FIRST,
    # --- training-only keys: accepted, validated by type, unused at inference ---
    "TRAINER": "replicated",
    "DATA.BASEDIR": "/path/to/your/DATA/DIR",
    "DATA.TRAIN": ["coco_train2017"],
    "DATA.VAL": ["coco_val2017"],
    "DATA.FILTER_EMPTY_ANNOTATIONS": True,
    "DATA.NUM_WORKERS": 10,
    "DATA.ABSOLUTE_COORD": True,
    "BACKBONE.WEIGHTS": "",
    "BACKBONE.FREEZE_AFFINE": False,
    "BACKBONE.FREEZE_AT": 2,
    "TRAIN.NUM_GPUS": _ANY,
    "TRAIN.WEIGHT_DECAY": 1e-4,
    "TRAIN.BASE_LR": 1e-2,
    "TRAIN.WARMUP": 1000,
    "TRAIN.WARMUP_INIT_LR": 1e-5,
    "TRAIN.STEPS_PER_EPOCH": 500,
    "TRAIN.STARTING_EPOCH": 1,
    "TRAIN.LR_SCHEDULE": _ANY,
    "TRAIN.EVAL_PERIOD": 50,
    "TRAIN.CHECKPOINT_PERIOD": 20,
    "PREPROC.TRAIN_SHORT_EDGE_SIZE": [800, 800],
    "RPN.ANCHOR_STRIDE": 16,
    "RPN.NUM_ANCHOR": 3,
    "RPN.POSITIVE_ANCHOR_THRESH": 0.7,
    "RPN.NEGATIVE_ANCHOR_THRESH": 0.3,
    "RPN.FG_RATIO": 0.5,
    "RPN.BATCH_PER_IM": 256,
    "RPN.CROWD_OVERLAP_THRESH": 9.99,
    "RPN.HEAD_DIM": 1024,
    "RPN.TRAIN_PRE_NMS_TOPK": 12000,
    "RPN.TRAIN_POST_NMS_TOPK": 2000,
    "RPN.TEST_PRE_NMS_TOPK": 6000,
    "RPN.TEST_POST_NMS_TOPK": 1000,
    "RPN.TRAIN_PER_LEVEL_NMS_TOPK": 2000,
    "FRCNN.BATCH_PER_IM": 512,
    "FRCNN.FG_THRESH": 0.5,
    "FRCNN.FG_RATIO": 0.25,
    "FPN.FRCNN_CONV_HEAD_DIM": 256,
    "CASCADE.IOUS": [0.5, 0.6, 0.7],
    "CASCADE.BBOX_REG_WEIGHTS": [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
    # aws-samples training-only keys (docs/model-conventions.md#config).
    "TRAIN.BATCH_SIZE_PER_GPU": 1,
    "TEST.BATCH_SIZE_PER_GPU": 1,
    "TRAIN.BACKBONE_NCHW": False,
    "TRAIN.FPN_NCHW": False,
    "TRAIN.RPN_NCHW": False,
    "TRAIN.MASK_NCHW": False,
    "TRAIN.LR_EPOCH_SCHEDULE": _ANY,
    "TRAIN.GRADIENT_CLIP": 0.0,
    "TRAIN.SEED": _ANY,
    "PREPROC.PREDEFINED_PADDING": False,
    "RPN.UNQUANTIZED_ANCHOR": True,
    "RPN.TOPK_PER_IMAGE": True,
    "RPN.SLOW_ACCURATE_MASK": True,
    "RPN.TRAIN_IMAGE_POST_NMS_TOPK": 2000,
    "RPN.TRAIN_PER_LEVEL_PRE_NMS_TOPK": 2000,
    "RPN.TRAIN_PER_LEVEL_POST_NMS_TOPK": 1000,
    "RPN.TEST_PER_LEVEL_POST_NMS_TOPK": 1000,
    "RPN.TEST_IMAGE_POST_NMS_TOPK": 1000,
}

# aws-samples names for keys that tensorpack calls differently; the value is stored under tensorpack's name.
ALIASES: dict[str, str] = {
    "FPN.BOXCLASS_HEAD_FUNC": "FPN.FRCNN_HEAD_FUNC",
    "FPN.BOXCLASS_FC_HEAD_DIM": "FPN.FRCNN_FC_HEAD_DIM",
    "FPN.BOXCLASS_CONV_HEAD_DIM": "FPN.FRCNN_CONV_HEAD_DIM",
    "RPN.TEST_PER_LEVEL_PRE_NMS_TOPK": "RPN.TEST_PER_LEVEL_NMS_TOPK",
}

# Values the inference graphs implement; anything else is refused at load instead of being served wrongly.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "MODE_FPN": (True,),
    "BACKBONE.NORM": ("FreezeBN",),
    "BACKBONE.TF_PAD_MODE": (False,),
    "BACKBONE.STRIDE_1X1": (False,),
    "FPN.NORM": ("None",),
    "FPN.PROPOSAL_MODE": ("Level",),
    "FPN.FRCNN_HEAD_FUNC": ("fastrcnn_2fc_head",),
    "FPN.MRCNN_HEAD_FUNC": ("maskrcnn_up4conv_head",),
    "FPN.CASCADE": (False,),
    "FPN.ANCHOR_STRIDES": ([4, 8, 16, 32, 64],),
    "FPN.RESOLUTION_REQUIREMENT": (32,),
    "SERVING.FC6_ROW_ORDER": (FC6_CHANNEL_FIRST, FC6_CHANNEL_LAST),
}


@dataclass(frozen=True)
class ModelConfig:
    """The resolved configuration: tensorpack's dotted keys mapped to values.

    ``explicit`` holds the keys that config.json or the environment set, so that the loader can tell a user's
    claim (which must agree with the checkpoint) from a default (which the checkpoint may replace).
    """

    values: Mapping[str, Any]
    explicit: frozenset[str] = field(default_factory=frozenset)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def replace(self, **updates: Any) -> ModelConfig:
        """A copy with ``updates`` (keys with ``__`` for ``.``, e.g. ``TEST__RESULTS_PER_IM=50``) applied."""
        values = dict(self.values)
        for name, value in updates.items():
            key = name.replace("__", ".")
            values[key] = _check_value(key, value, "replace()")
        return ModelConfig(values, self.explicit | {k.replace("__", ".") for k in updates})

    def inference(self) -> InferenceConfig:
        """The typed inference settings (see :class:`InferenceConfig`)."""
        mult = float(self["FPN.RESOLUTION_REQUIREMENT"])
        return InferenceConfig(
            short_edge_size=int(self["PREPROC.TEST_SHORT_EDGE_SIZE"]),
            # tensorpack rounds MAX_SIZE up to the FPN resolution (1333 -> 1344.0)
            max_size=math.ceil(self["PREPROC.MAX_SIZE"] / mult) * mult,
            pixel_mean_bgr=tuple(float(v) for v in self["PREPROC.PIXEL_MEAN"][::-1]),
            pixel_std_bgr=tuple(float(v) for v in self["PREPROC.PIXEL_STD"][::-1]),
            anchor_strides=tuple(int(v) for v in self["FPN.ANCHOR_STRIDES"]),
            anchor_sizes=tuple(float(v) for v in self["RPN.ANCHOR_SIZES"]),
            anchor_ratios=tuple(float(v) for v in self["RPN.ANCHOR_RATIOS"]),
            rpn_min_size=float(self["RPN.MIN_SIZE"]),
            rpn_nms_threshold=float(self["RPN.PROPOSAL_NMS_THRESH"]),
            rpn_per_level_topk=int(self["RPN.TEST_PER_LEVEL_NMS_TOPK"]),
            bbox_reg_weights=tuple(float(v) for v in self["FRCNN.BBOX_REG_WEIGHTS"]),
            frcnn_nms_threshold=float(self["TEST.FRCNN_NMS_THRESH"]),
            score_threshold=float(self["TEST.RESULT_SCORE_THRESH"]),
            vis_score_threshold=float(self["TEST.RESULT_SCORE_THRESH_VIS"]),
            results_per_image=int(self["TEST.RESULTS_PER_IM"]),
            accurate_paste=bool(self["MRCNN.ACCURATE_PASTE"]),
            fc6_row_order=str(self["SERVING.FC6_ROW_ORDER"]),
        )


@dataclass(frozen=True)
class InferenceConfig:
    """The inference settings of a model, typed, resolved once from its :class:`ModelConfig` (see
    :meth:`ModelConfig.inference`): the only view of the config that code outside this module and
    :mod:`maskrcnn_serving.model_dir` reads.

    Frames: pixel means and standard deviations are per channel in **BGR** order (the order images are decoded in);
    sizes are in pixels of the resized network input.
    """

    short_edge_size: int  # PREPROC.TEST_SHORT_EDGE_SIZE
    max_size: float  # PREPROC.MAX_SIZE rounded up to FPN.RESOLUTION_REQUIREMENT, as tensorpack finalizes it
    pixel_mean_bgr: tuple[float, float, float]
    pixel_std_bgr: tuple[float, float, float]
    anchor_strides: tuple[int, ...]  # FPN.ANCHOR_STRIDES, P2..P6
    anchor_sizes: tuple[float, ...]
    anchor_ratios: tuple[float, ...]
    rpn_min_size: float
    rpn_nms_threshold: float
    rpn_per_level_topk: int  # RPN.TEST_PER_LEVEL_NMS_TOPK
    bbox_reg_weights: tuple[float, float, float, float]  # FRCNN.BBOX_REG_WEIGHTS
    frcnn_nms_threshold: float  # TEST.FRCNN_NMS_THRESH
    score_threshold: float  # TEST.RESULT_SCORE_THRESH: the graph's default
    vis_score_threshold: float  # TEST.RESULT_SCORE_THRESH_VIS: the server's default, as the seed container
    results_per_image: int  # TEST.RESULTS_PER_IM
    accurate_paste: bool  # MRCNN.ACCURATE_PASTE
    fc6_row_order: str  # SERVING.FC6_ROW_ORDER

    @property
    def box_clip(self) -> float:
        """The clip on exp() arguments of box decoding: log(MAX_SIZE / 16) with the finalized MAX_SIZE."""
        return math.log(self.max_size / 16.0)


def _type_matches(default: Any, value: Any) -> bool:
    if default is _ANY:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list | tuple)
    return True


def canonical_key(key: str, source: str) -> str:
    """Map an aws-samples alias to tensorpack's name; reject keys neither codebase knows."""
    key = ALIASES.get(key, key)
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, list(DEFAULTS) + list(ALIASES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"Unknown config key {key!r} (from {source}).{hint}")
    return key


def _check_value(key: str, value: Any, source: str) -> Any:
    default = DEFAULTS[key]
    if not _type_matches(default, value):
        raise ModelLoadError(
            f"Config key {key} from {source} has value {value!r} of type {type(value).__name__}; "
            f"expected a value like the default {default!r}."
        )
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    return value


def parse_env_value(text: str) -> Any:
    """Parse an environment override as JSON, else a Python literal, else a plain string. Never evaluates code."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def config_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that :func:`load_config` reads (``RESNET_ARCH``, ``CONFIG__*``): what another
    process (a Ray actor on another machine) needs to load the same model config."""
    return {name: value for name, value in environ.items() if name == "RESNET_ARCH" or name.startswith(ENV_PREFIX)}


def load_config(model_dir: Path | None, environ: Mapping[str, str]) -> ModelConfig:
    """Resolve the configuration of ``model_dir`` (whose config.json is optional) under ``environ``."""
    values: dict[str, Any] = {k: v for k, v in DEFAULTS.items() if v is not _ANY}
    values.update({k: None for k, v in DEFAULTS.items() if v is _ANY})
    explicit: set[str] = set()

    def apply(key: str, value: Any, source: str) -> None:
        key = canonical_key(key, source)
        values[key] = _check_value(key, value, source)
        explicit.add(key)

    config_path = model_dir / CONFIG_FILE_NAME if model_dir is not None else None
    if config_path is not None and config_path.is_file():
        try:
            data = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{config_path} must hold a JSON object of dotted config keys.")
        for key, value in data.items():
            apply(key, value, str(config_path))

    arch = environ.get("RESNET_ARCH")  # the variables read here are config_environment's
    if arch:
        if arch not in RESNET_ARCHS:
            raise ModelLoadError(f"RESNET_ARCH={arch!r} is not one of {', '.join(RESNET_ARCHS)}.")
        apply("BACKBONE.RESNET_NUM_BLOCKS", RESNET_ARCHS[arch], f"RESNET_ARCH={arch}")

    for name in sorted(environ):
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].replace("__", ".")
            apply(key, parse_env_value(environ[name]), f"environment variable {name}")

    for key, allowed in SUPPORTED_VALUES.items():
        if values[key] not in allowed:
            raise ModelLoadError(
                f"Config {key}={values[key]!r} is not supported by this server (supported: "
                f"{', '.join(repr(a) for a in allowed)})."
            )
    return ModelConfig(values, frozenset(explicit))
