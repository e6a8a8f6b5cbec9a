"""Build random-weight checkpoints in tensorpack format (TF bundle or npz) for tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from maskrcnn_serving.checkpoint import Architecture, expected_variables

R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)


def small_architecture(blocks=(1, 1, 1, 1), classes: int = 3, mask: bool = True) -> Architecture:
    """A narrow architecture so that random-weight graphs build and run in seconds."""
    return Architecture(
        resnet_num_blocks=tuple(blocks), num_categories=classes, fpn_channels=16, fc_head_dim=32,
        mask_head_dim=16 if mask else None,
    )


def random_weights(arch: Architecture, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random variables with the exact names and shapes the graph expects (BN variances positive)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_variables(arch).items():
        if name.endswith("variance/EMA"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.2, 0.5, shape)
        else:
            value = rng.normal(0.0, 0.05, shape)
        weights[name] = value.astype(dtype)
    return weights


def write_npz(path: Path, weights: Mapping[str, np.ndarray], with_suffix: bool = True) -> Path:
    """npz as tensorpack's dump tool writes it (``name:0`` keys) or without the suffix."""
    np.savez(path, **{(f"{k}:0" if with_suffix else k): v for k, v in weights.items()})
    return path


def write_tf_checkpoint(model_dir: Path, weights: Mapping[str, np.ndarray], step: int = 0,
                        extra: Mapping[str, np.ndarray] | None = None) -> Path:
    """A TF V2 checkpoint ``model-<step>`` (index + data, and the ``checkpoint`` state file naming it) with the
    given variables (plus ``extra``, e.g. optimizer slots), written as ``tf.compat.v1.train.Saver`` writes them
    (the same SaveV2 op, without building a graph of 562 variables first: ~10x faster for R101)."""
    import tensorflow as tf

    tensors = {**weights, **(extra or {})}
    prefix = model_dir / f"model-{step}"
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=list(tensors), shape_and_slices=[""] * len(tensors),
                      tensors=[tf.constant(v) for v in tensors.values()])
    (model_dir / "checkpoint").write_text(
        f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
    )
    return prefix


def fc6_row_order_model_dirs(root_first: Path, root_last: Path, blocks=(1, 1, 1, 1), seed: int = 0,
                             step: int = 1) -> tuple[Path, Path]:
    """The same random small model (3 classes, made confident so that it detects things) stored twice: with
    channel-first fc6 rows as an npz in ``root_first``, and with channel-last rows as a TF checkpoint plus the
    config that says so in ``root_last``."""
    import json

    arch = small_architecture(blocks=blocks, classes=3)
    weights = random_weights(arch, seed=seed)
    weights["fastrcnn/outputs/class/b"] = np.array([-3.0, 2.0, 1.0, 0.5], np.float32)
    write_npz(root_first / "model.npz", weights)
    fc6 = weights["fastrcnn/fc6/W"]
    channel_last = fc6.reshape(arch.fpn_channels, 7, 7, -1).transpose(1, 2, 0, 3).reshape(fc6.shape)
    write_tf_checkpoint(root_last, {**weights, "fastrcnn/fc6/W": channel_last}, step=step)
    (root_last / "config.json").write_text(json.dumps({"SERVING.FC6_ROW_ORDER": "channel_last"}))
    return root_first, root_last
