"""Find, read and strictly check tensorpack / aws-samples Mask R-CNN checkpoints.

Accepted files in a model directory (not searched recursively):

* TF V2 checkpoints ``model-<step>.index`` + ``model-<step>.data-*``: the one named by the ``checkpoint`` file if
  present, else the highest step *numerically* (the seed containers compared strings, so 90000 beat 180000);
* one ``.npz`` file, keys with or without ``:0`` (tensorpack's dump tool writes ``conv0/W:0``).

float16 arrays (aws-samples fp16 runs, the bundled fixtures) are upcast to float32. Optimizer slots, EMA/AccumGrad
training variables, ``global_step`` and ``learning_rate`` are dropped. Everything else must be exactly the set of
variables the inference graph uses, with the right shapes: a missing, extra or mis-shaped variable is an error
that names it, never a model served with random weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskrcnn_serving.errors import ModelLoadError

_INDEX_RE = re.compile(r"^model-(\d+)\.index$")
_CHECKPOINT_LINE_RE = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$')
_TRAINING_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/Adadelta", "/Adadelta_1", "/RMSProp", "/RMSProp_1",
                      "/Adagrad", "/AccumGrad")
_NON_MODEL_NAMES = {"global_step", "learning_rate"}


def is_training_name(name: str) -> bool:
    """True for variables that exist only for training (tensorpack's ``is_training_name`` plus step and LR)."""
    return (
        name in _NON_MODEL_NAMES
        or name.endswith(_TRAINING_SUFFIXES)
        or name.startswith(("EMA/", "AccumGrad", "apply_gradients"))
        or "/EMA/" in name
        or "/AccumGrad/" in name
    )


def find_checkpoint(model_dir: Path) -> Path:
    """Return the checkpoint to load from ``model_dir``: a TF checkpoint prefix or an ``.npz`` path."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"Model directory {model_dir} does not exist or is not a directory.")
    state_file = model_dir / "checkpoint"
    if state_file.is_file():
        for line in state_file.read_text(errors="replace").splitlines():
            match = _CHECKPOINT_LINE_RE.match(line.strip())
            if match:
                prefix = Path(match.group(1))
                prefix = prefix if prefix.is_absolute() else model_dir / prefix
                # A checkpoint file copied from another machine may hold an absolute path: fall back to its name.
                if not Path(f"{prefix}.index").is_file():
                    prefix = model_dir / prefix.name
                if Path(f"{prefix}.index").is_file():
                    return prefix
                raise ModelLoadError(
                    f"{state_file} names checkpoint {match.group(1)!r}, but {prefix}.index does not exist."
                )
    steps = sorted(
        (int(m.group(1)), p) for p in model_dir.iterdir() if (m := _INDEX_RE.match(p.name)) is not None
    )
    if steps:
        return steps[-1][1].with_suffix("")
    npz_files = sorted(model_dir.glob("*.npz"))
    if len(npz_files) == 1:
        return npz_files[0]
    if len(npz_files) > 1:
        raise ModelLoadError(
            f"Model directory {model_dir} holds several .npz files ({', '.join(p.name for p in npz_files)}); "
            "keep exactly one."
        )
    raise ModelLoadError(
        f"No checkpoint in {model_dir}: expected model-<step>.index + model-<step>.data-* files or one .npz file."
    )


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a checkpoint into float32 numpy arrays keyed by variable name (no ``:0``)."""
    if path.suffix == ".npz":
        return _read_npz(path)
    return _read_tf_checkpoint(path)


def _as_float32(value: np.ndarray) -> np.ndarray:
    """Upcast float16 (fp16 training runs, compact npz files) and downcast float64 to the graph's float32."""
    if value.dtype in (np.float16, np.float64):
        return value.astype(np.float32)
    return value


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        tensors = {}
        for key in archive.files:
            name = key[:-2] if key.endswith(":0") else key
            tensors[name] = _as_float32(archive[key])
    except Exception as exc:  # a truncated or foreign file raises anything from zipfile, numpy or pickle
        raise ModelLoadError(f"Cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    return tensors


def _read_tf_checkpoint(prefix: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = reader.get_variable_to_shape_map()
        return {name: _as_float32(np.asarray(reader.get_tensor(name))) for name in names}
    except Exception as exc:  # TF raises DataLossError, NotFoundError, ... for damaged bundles
        raise ModelLoadError(f"Cannot read TF checkpoint {prefix}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Architecture:
    """What the checkpoint says about the network. Every field is read from variable shapes."""

    resnet_num_blocks: tuple[int, int, int, int]
    num_categories: int  # K foreground classes; the box head has K + 1 outputs
    fpn_channels: int
    fc_head_dim: int
    mask_head_dim: int | None  # None for a Faster R-CNN checkpoint (no mask head)
    num_anchors: int = 3

    @property
    def is_mask_rcnn(self) -> bool:
        return self.mask_head_dim is not None


_GROUP_WIDTHS = (64, 128, 256, 512)
_MASK_CONVS = 4


def _backbone_variables(blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(scope: str, kernel: tuple[int, int, int, int]) -> None:
        shapes[f"{scope}/W"] = kernel
        for stat in ("gamma", "beta", "mean/EMA", "variance/EMA"):
            shapes[f"{scope}/bn/{stat}"] = (kernel[3],)

    conv_bn("conv0", (7, 7, 3, 64))
    channels_in = 64
    for group, (count, width) in enumerate(zip(blocks, _GROUP_WIDTHS, strict=True)):
        for block in range(count):
            scope = f"group{group}/block{block}"
            conv_bn(f"{scope}/conv1", (1, 1, channels_in, width))
            conv_bn(f"{scope}/conv2", (3, 3, width, width))
            conv_bn(f"{scope}/conv3", (1, 1, width, width * 4))
            if block == 0:
                conv_bn(f"{scope}/convshortcut", (1, 1, channels_in, width * 4))
            channels_in = width * 4
    return shapes


def expected_variables(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every variable of the inference graph with its shape, in tensorpack's creation order."""
    shapes = _backbone_variables(arch.resnet_num_blocks)
    c = arch.fpn_channels
    for level, c_in in zip((2, 3, 4, 5), (256, 512, 1024, 2048), strict=True):
        shapes[f"fpn/lateral_1x1_c{level}/W"] = (1, 1, c_in, c)
        shapes[f"fpn/lateral_1x1_c{level}/b"] = (c,)
    for level in (2, 3, 4, 5):
        shapes[f"fpn/posthoc_3x3_p{level}/W"] = (3, 3, c, c)
        shapes[f"fpn/posthoc_3x3_p{level}/b"] = (c,)
    a = arch.num_anchors
    shapes.update({
        "rpn/conv0/W": (3, 3, c, c), "rpn/conv0/b": (c,),
        "rpn/class/W": (1, 1, c, a), "rpn/class/b": (a,),
        "rpn/box/W": (1, 1, c, 4 * a), "rpn/box/b": (4 * a,),
    })
    d, k = arch.fc_head_dim, arch.num_categories
    shapes.update({
        "fastrcnn/fc6/W": (c * 7 * 7, d), "fastrcnn/fc6/b": (d,),
        "fastrcnn/fc7/W": (d, d), "fastrcnn/fc7/b": (d,),
        "fastrcnn/outputs/class/W": (d, k + 1), "fastrcnn/outputs/class/b": (k + 1,),
        "fastrcnn/outputs/box/W": (d, 4 * (k + 1)), "fastrcnn/outputs/box/b": (4 * (k + 1),),
    })
    if arch.mask_head_dim is not None:
        m = arch.mask_head_dim
        c_in = c
        for i in range(_MASK_CONVS):
            shapes[f"maskrcnn/fcn{i}/W"] = (3, 3, c_in, m)
            shapes[f"maskrcnn/fcn{i}/b"] = (m,)
            c_in = m
        shapes.update({
            "maskrcnn/deconv/W": (2, 2, m, m), "maskrcnn/deconv/b": (m,),
            "maskrcnn/conv/W": (1, 1, m, k), "maskrcnn/conv/b": (k,),
        })
    return shapes


def _require(tensors: Mapping[str, np.ndarray], name: str, rank: int, path: Path) -> tuple[int, ...]:
    if name not in tensors:
        raise ModelLoadError(
            f"Checkpoint {path} has no variable {name!r}: it is not a tensorpack / aws-samples ResNet-FPN "
            f"Mask R-CNN checkpoint (it holds {len(tensors)} variables, e.g. {', '.join(sorted(tensors)[:5])})."
        )
    shape = tuple(tensors[name].shape)
    if len(shape) != rank:
        raise ModelLoadError(f"Checkpoint variable {name!r} has shape {list(shape)}; expected rank {rank}.")
    return shape


def infer_architecture(tensors: Mapping[str, np.ndarray], path: Path) -> Architecture:
    """Read the architecture from variable names and shapes (blocks per group, classes, head widths)."""
    blocks = []
    for group in range(4):
        count = 0
        while f"group{group}/block{count}/conv1/W" in tensors:
            count += 1
        if count == 0:
            _require(tensors, f"group{group}/block0/conv1/W", 4, path)
        blocks.append(count)
    fpn_channels = _require(tensors, "fpn/lateral_1x1_c2/W", 4, path)[3]
    fc_head_dim = _require(tensors, "fastrcnn/fc7/W", 2, path)[1]
    num_classes = _require(tensors, "fastrcnn/outputs/class/W", 2, path)[1]
    num_anchors = _require(tensors, "rpn/class/W", 4, path)[3]
    mask_head_dim = None
    if any(name.startswith("maskrcnn/") for name in tensors):
        mask_head_dim = _require(tensors, "maskrcnn/fcn0/W", 4, path)[3]
    if num_classes < 2:
        raise ModelLoadError(f"Checkpoint {path}: fastrcnn/outputs/class/W has {num_classes} outputs; need >= 2.")
    return Architecture(
        resnet_num_blocks=(blocks[0], blocks[1], blocks[2], blocks[3]),
        num_categories=num_classes - 1,
        fpn_channels=fpn_channels,
        fc_head_dim=fc_head_dim,
        mask_head_dim=mask_head_dim,
        num_anchors=num_anchors,
    )


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_variables(
    tensors: Mapping[str, np.ndarray], arch: Architecture, path: Path
) -> dict[str, np.ndarray]:
    """Return exactly the variables of ``arch`` from ``tensors``, or raise naming what is missing or wrong."""
    expected = expected_variables(arch)
    model_names = {n for n in tensors if not is_training_name(n)}
    missing = [n for n in expected if n not in model_names]
    unexpected = sorted(model_names - expected.keys())
    mismatched = [
        f"{n} {list(tensors[n].shape)} (expected {list(expected[n])})"
        for n in expected
        if n in tensors and tuple(tensors[n].shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} variable(s): {_listing(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} variable(s) with the wrong shape: {_listing(mismatched)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} variable(s) this model does not use (a GroupNorm, Cascade or C4 model is not "
            f"supported): {_listing(unexpected)}"
        )
    if problems:
        raise ModelLoadError(f"Checkpoint {path} does not match the {describe(arch)} graph: " + "; ".join(problems))
    non_float = [n for n in expected if tensors[n].dtype != np.float32]
    if non_float:
        raise ModelLoadError(f"Checkpoint {path}: variables with non-float dtype: {_listing(non_float)}")
    return {n: tensors[n] for n in expected}


def describe(arch: Architecture) -> str:
    names = {(3, 4, 6, 3): "ResNet-50", (3, 4, 23, 3): "ResNet-101"}
    backbone = names.get(arch.resnet_num_blocks, f"ResNet with blocks {list(arch.resnet_num_blocks)}")
    kind = "Mask R-CNN" if arch.is_mask_rcnn else "Faster R-CNN"
    return f"{backbone}-FPN {kind} ({arch.num_categories} classes)"
