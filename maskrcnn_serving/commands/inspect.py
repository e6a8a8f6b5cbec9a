"""``maskrcnn-serving inspect``: validate a model directory and print what the server would load, without a graph;
``--gpu-audit``: build the backend's inference graph and list the ops that would not run on a GPU
(:mod:`maskrcnn_serving.gpu_audit`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskrcnn_serving.commands import add_model_arguments, settings_from_args
from maskrcnn_serving.settings import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="Check a model directory strictly (checkpoint, config, architecture) and print a JSON summary.",
    )
    add_model_arguments(parser)
    audit = parser.add_argument_group("GPU kernel audit (no GPU needed: TensorFlow's CUDA build lists its kernels)")
    audit.add_argument(
        "--gpu-audit", action="store_true",
        help="Build the backend's inference graph as configured on a GPU and list the ops without a GPU kernel for "
        "their dtypes (they would run on the CPU), ops XLA could not compile (MASKRCNN_XLA=1), and what stays on the "
        "host by design. Exit status 1 when an op would leave the GPU.",
    )
    audit.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="Optimized backend precision (default: $MASKRCNN_PRECISION or mixed = float16 on a GPU).")
    audit.add_argument("--batch-size", type=int, default=1, help="Images per graph call to trace (default 1).")
    audit.add_argument("--json", type=Path, default=None, help="Also write the audit as JSON here.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.gpu_audit:
        return run_gpu_audit(args)
    if args.precision is not None or args.json is not None:
        raise SystemExit("error: --precision and --json go with --gpu-audit")
    from maskrcnn_serving.checkpoint import describe
    from maskrcnn_serving.model_dir import load_model_dir

    bundle = load_model_dir(settings_from_args(args).model_dir)
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


def run_gpu_audit(args: argparse.Namespace) -> int:
    """The backend of the settings (environment and flags), configured as on a GPU machine whatever this one has
    (``mixed`` precision means float16, ``MASKRCNN_WINOGRAD=auto`` no Winograd), audited through its graph."""
    from maskrcnn_serving.backends.base import get_backend_class, load_backend
    from maskrcnn_serving.gpu_audit import audit_backend

    try:
        settings = settings_from_args(args, precision=args.precision)
        backend_class = get_backend_class(settings.backend)
        if args.precision is not None and args.precision not in backend_class.precisions:
            raise ValueError(f"the {settings.backend} backend computes in {' or '.join(backend_class.precisions)} "
                             f"only, not {args.precision}")
        backend = load_backend(settings.backend, settings.model_dir, settings, for_gpu=True)
        report = audit_backend(backend, batch_size=args.batch_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    document = report.to_json()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    xla = ", XLA" if report.xla else ""
    print(f"GPU kernel audit: {report.backend} backend, {report.precision}{xla}: {report.ops_total} ops")
    for title, findings in (("no GPU kernel (would run on the CPU)", report.cpu_only),
                            ("XLA cannot compile for the GPU", report.xla_uncompilable)):
        print(f"{title}: {len(findings) or 'none'}")
        for finding in findings:
            print(f"  {finding.op} [{', '.join(finding.dtypes)}] x{finding.count}: {'; '.join(finding.where)}")
    print("on the host by design:")
    for item in report.host_by_design:
        print(f"  {item.op}: {item.reason}")
    return 0 if report.clean else 1
