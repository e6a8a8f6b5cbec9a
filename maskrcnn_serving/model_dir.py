"""Load a model directory: config + checkpoint + architecture, cross-checked, ready for any backend."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from maskrcnn_serving.checkpoint import (
    Architecture,
    check_variables,
    describe,
    find_checkpoint,
    infer_architecture,
    read_checkpoint,
)
from maskrcnn_serving.config import FC6_CHANNEL_LAST, RESNET_ARCHS, InferenceConfig, ModelConfig, load_config
from maskrcnn_serving.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/opt/ml/model"

COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class ModelBundle:
    """Everything a backend needs to build and run the network.

    ``weights`` maps tensorpack variable names to float32 arrays exactly as stored in the checkpoint (fc6 rows in
    the order ``config["SERVING.FC6_ROW_ORDER"]`` says). ``class_names[0]`` is ``"BG"``; label k names
    ``class_names[k]``. ``inference`` is the typed view of ``config`` that the networks and the server read.
    """

    model_dir: Path
    checkpoint_path: Path
    config: ModelConfig
    architecture: Architecture
    weights: Mapping[str, np.ndarray]
    class_names: tuple[str, ...]

    @cached_property
    def inference(self) -> InferenceConfig:
        return self.config.inference()

    @property
    def num_categories(self) -> int:
        return self.architecture.num_categories

    def fc6_weight_channel_last(self, resolution: int = 7) -> np.ndarray:
        """``fastrcnn/fc6/W`` with rows in channel-last order ((y*r + x)*C + c), for NHWC RoI features flattened as
        they lie in memory. tensorpack / aws-samples TF1 checkpoints store channel-first rows (c*r*r + y*r + x)."""
        weight = self.weights["fastrcnn/fc6/W"]
        if self.config["SERVING.FC6_ROW_ORDER"] == FC6_CHANNEL_LAST:
            return weight
        channels, out_dim = self.architecture.fpn_channels, weight.shape[1]
        return weight.reshape(channels, resolution, resolution, out_dim).transpose(1, 2, 0, 3).reshape(-1, out_dim)


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """The directory, or SageMaker's ``/opt/ml/model`` for None. ``SM_MODEL_DIR`` is read with the other settings
    (``Settings.model_dir``): callers pass that."""
    return Path(model_dir or DEFAULT_MODEL_DIR)


def _cross_check(config: ModelConfig, arch: Architecture, source: str) -> None:
    """A value the user set that contradicts the checkpoint is an error, never a silently wrong model."""
    claims = {
        "BACKBONE.RESNET_NUM_BLOCKS": (list(config["BACKBONE.RESNET_NUM_BLOCKS"]), list(arch.resnet_num_blocks)),
        "FPN.NUM_CHANNEL": (config["FPN.NUM_CHANNEL"], arch.fpn_channels),
        "FPN.FRCNN_FC_HEAD_DIM": (config["FPN.FRCNN_FC_HEAD_DIM"], arch.fc_head_dim),
        "MODE_MASK": (config["MODE_MASK"], arch.is_mask_rcnn),
        "DATA.NUM_CATEGORY": (config["DATA.NUM_CATEGORY"], arch.num_categories),
    }
    if arch.mask_head_dim is not None:
        claims["MRCNN.HEAD_DIM"] = (config["MRCNN.HEAD_DIM"], arch.mask_head_dim)
    for key, (claimed, actual) in claims.items():
        if key in config.explicit and claimed != actual:
            hint = ""
            if key == "BACKBONE.RESNET_NUM_BLOCKS":
                arch_names = {tuple(v): k for k, v in RESNET_ARCHS.items()}
                hint = f" (the checkpoint is {arch_names.get(tuple(actual), 'neither resnet50 nor resnet101')})"
            raise ModelLoadError(
                f"{key}={claimed!r} (set in config.json or the environment) contradicts the checkpoint {source}, "
                f"which has {actual!r}{hint}. Remove the setting or use the matching checkpoint."
            )


def _class_names(config: ModelConfig, arch: Architecture) -> tuple[str, ...]:
    names = list(config["DATA.CLASS_NAMES"])
    k = arch.num_categories
    if "DATA.CLASS_NAMES" not in config.explicit or not names:
        if k == len(COCO_CLASS_NAMES):
            return ("BG", *COCO_CLASS_NAMES)
        log.warning("No DATA.CLASS_NAMES in the config; naming the %d classes class_1..class_%d.", k, k)
        return ("BG", *(f"class_{i}" for i in range(1, k + 1)))
    if len(names) != k + 1:
        raise ModelLoadError(
            f"DATA.CLASS_NAMES has {len(names)} entries but the checkpoint has {k} classes: list "
            f"{k + 1} names, starting with the background \"BG\" as tensorpack does."
        )
    if not all(isinstance(n, str) for n in names):
        raise ModelLoadError("DATA.CLASS_NAMES must be a list of strings.")
    return tuple(names)


def load_model_dir(model_dir: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ModelBundle:
    """Load and validate a model directory (None: ``/opt/ml/model``); raise :class:`ModelLoadError` with a fixable
    message otherwise. ``environ``: where the model config's overrides (``CONFIG__*``, ``RESNET_ARCH``) are read
    (default: the process environment)."""
    environ = os.environ if environ is None else environ
    directory = resolve_model_dir(model_dir)
    config = load_config(directory if directory.is_dir() else None, environ)
    checkpoint_path = find_checkpoint(directory)
    tensors = read_checkpoint(checkpoint_path)
    arch = infer_architecture(tensors, checkpoint_path)
    _cross_check(config, arch, str(checkpoint_path))
    weights = check_variables(tensors, arch, checkpoint_path)
    class_names = _class_names(config, arch)
    log.info("Loaded %s from %s (%d variables).", describe(arch), checkpoint_path, len(weights))
    return ModelBundle(directory, checkpoint_path, config, arch, weights, class_names)
