"""``maskrcnn-serving inspect``: validate a model directory and print what the server would load, without a graph."""

from __future__ import annotations

import argparse
import json

from maskrcnn_serving.commands import add_model_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="Check a model directory strictly (checkpoint, config, architecture) and print a JSON summary.",
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from maskrcnn_serving.checkpoint import describe
    from maskrcnn_serving.model_dir import load_model_dir

    bundle = load_model_dir(args.model_dir)
    arch, cfg, inference = bundle.architecture, bundle.config, bundle.inference
    summary = {
        "model_dir": str(bundle.model_dir),
        "checkpoint": str(bundle.checkpoint_path),
        "model": describe(arch),
        "resnet_num_blocks": list(arch.resnet_num_blocks),
        "fpn_channels": arch.fpn_channels,
        "fc_head_dim": arch.fc_head_dim,
        "mask_head_dim": arch.mask_head_dim,
        "class_names": list(bundle.class_names[1:]),
        "parameters": int(sum(w.size for w in bundle.weights.values())),
        "config_set": {key: cfg[key] for key in sorted(cfg.explicit)},
        "resize": {"short_edge": inference.short_edge_size, "max_size": inference.max_size},
        "fc6_row_order": inference.fc6_row_order,
    }
    print(json.dumps(summary, indent=2))
    return 0
