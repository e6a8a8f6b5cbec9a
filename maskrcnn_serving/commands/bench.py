"""``maskrcnn-serving bench``: measure the model in-process, an endpoint under load, or two configurations side by side.

    bench model    --model-dir DIR [--backend NAME] [--precision P] [--sizes ...] [--batch-sizes ...] [--json OUT]
    bench model    --model-dir DIR --stream N        (real traffic: N photos of mixed sizes, after the warm-up)
    bench http     (--url URL | --sagemaker-endpoint NAME) [--concurrency 1,2,4] [--rates 1,2] [--json OUT]
    bench compare model --model-dir DIR --a SPEC --b SPEC     (two pipelines, interleaved, ratio B/A)
    bench compare rle   [--a legacy --b seed]                 (two mask encoders, interleaved, identical output?)

Every command prints a table, and writes the JSON report (``--json``) and a PNG figure (``--plot``, by default next
to the JSON). docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from maskrcnn_serving.commands import add_model_arguments, settings_from_args
from maskrcnn_serving.settings import Settings


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _size(text: str) -> tuple[int, int]:
    from maskrcnn_serving.bench.images import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="Override a tensorpack config key for this run, e.g. PREPROC.TEST_SHORT_EDGE_SIZE=800 (repeatable).",
    )
    parser.add_argument("--detections", type=int, default=100,
                        help="Detections per image, fixed: max_detections N with score threshold 0 (default 100).")
    parser.add_argument("--score-threshold", type=float, default=0.0,
                        help="Score threshold (default 0, so that weak or random weights cannot shrink the work).")


def _add_stream_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--stream", type=int, default=0, metavar="N", help=help_text)
    parser.add_argument("--stream-seed", type=int, default=0, help="Seed of the --stream (default 0).")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="Write the report as JSON here.")
    parser.add_argument("--plot", type=Path, default=None,
                        help="Write the PNG figure here (default: next to --json, same name, .png).")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="Benchmarks: the model in-process, an endpoint under load, two configurations side by side."
    )
    commands = parser.add_subparsers(dest="bench_command", required=True)

    model = commands.add_parser(
        "model",
        help="In-process throughput, latency, peak memory and stage breakdown, per image size and batch size.",
        description="Encoded JPEGs (synthetic, made in-process) through the server's own pipeline: decode, "
        "preprocess, model, postprocess, encode. Warm-up excluded. Each (size, batch) stops after --iterations "
        "calls or when its share of the time budget is spent (--max-seconds, --max-total-seconds).",
    )
    add_model_arguments(model)
    model.add_argument("--precision", default=None, help="Backend precision option (optimized backend).")
    model.add_argument("--backend-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="A setting of `serve` by its name, e.g. xla=true or max_batch_size=4 (repeatable).")
    _add_pipeline_arguments(model)
    model.add_argument("--format", default="legacy", choices=("legacy", "coco", "polygon", "boxes", "seed"),
                       help="Response format: legacy (the server's default), coco, polygon, boxes, or seed (the seed "
                       "containers' groupby encoder, slow).")
    model.add_argument("--sizes", type=_csv(_size), default=None,
                       help="Input sizes WIDTHxHEIGHT, comma-separated (default 640x480,1333x800,4000x3000).")
    model.add_argument("--batch-sizes", type=_csv(int), default=[1, 2],
                       help="Images per request/backend call, comma-separated (default 1,2).")
    model.add_argument("--iterations", type=int, default=20, help="Timed calls per configuration, at most.")
    model.add_argument("--max-seconds", type=float, default=15.0,
                       help="Seconds per configuration, at most (default 15; at least 2 timed calls run).")
    model.add_argument("--max-total-seconds", type=float, default=180.0,
                       help="Seconds for all configurations together (default 180): when a configuration overruns, "
                       "the following ones get less time, never fewer than 2 timed calls.")
    model.add_argument("--warmup", type=int, default=1, help="Discarded calls per configuration (default 1).")
    _add_stream_arguments(model, "Instead of --sizes: after the server's warm-up, send N photos of mixed sizes and "
                          "orientations (bench/traffic.py), one per request, then the same N again; report per-image "
                          "p50/p99 and the share of the first pass that new sizes cost.")
    _add_output_arguments(model)
    model.set_defaults(func=run_model)

    http = commands.add_parser(
        "http",
        help="Load an endpoint: closed-loop concurrency sweep and open-loop fixed arrival rates.",
        description="Bounded by --requests and --duration per load level; it stops by itself. Use it against "
        "servers you run (here: 127.0.0.1 only) or your own SageMaker endpoint.",
    )
    where = http.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="Server URL, e.g. http://127.0.0.1:8080 (POST /invocations).")
    where.add_argument("--sagemaker-endpoint", help="SageMaker endpoint name (boto3 invoke_endpoint).")
    http.add_argument("--region", default=None, help="AWS region of the endpoint (default: boto3's).")
    http.add_argument("--images", type=Path, nargs="*", default=None,
                      help="Image files or folders to send (default: synthetic JPEGs of --size).")
    http.add_argument("--size", type=_size, default=(640, 480), help="Synthetic image size (default 640x480).")
    _add_stream_arguments(http, "Instead of one --size: the first N photos of the mixed stream of bench/traffic.py "
                          "(sizes and orientations of real traffic), sent in that order.")
    http.add_argument("--images-per-request", type=int, default=1, help="Images per request (list form).")
    http.add_argument("--raw", action="store_true", help="Send raw image/jpeg bodies instead of JSON.")
    http.add_argument("--field", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                      help="Extra JSON field per image, e.g. format=coco or max_detections=100 (repeatable).")
    http.add_argument("--concurrency", type=_csv(int), default=[1, 2, 4],
                      help="Closed-loop client counts to sweep (default 1,2,4; empty to skip).")
    http.add_argument("--rates", type=_csv(float), default=[],
                      help="Open-loop arrival rates in requests/s (default: none).")
    http.add_argument("--poisson", action="store_true", help="Open loop: Poisson arrivals instead of even spacing.")
    http.add_argument("--requests", type=int, default=40, help="Requests per load level, at most (default 40).")
    http.add_argument("--duration", type=float, default=30.0, help="Seconds per load level, at most (default 30).")
    http.add_argument("--warmup", type=int, default=2, help="Sequential requests before measuring (default 2).")
    http.add_argument("--timeout", type=float, default=120.0, help="Per-request timeout in seconds.")
    http.add_argument("--max-in-flight", type=int, default=64, help="Open loop: concurrent requests, at most.")
    _add_output_arguments(http)
    http.set_defaults(func=run_http)

    compare = commands.add_parser(
        "compare", help="Two configurations interleaved in one run, and their ratio (robust on a noisy machine)."
    )
    kinds = compare.add_subparsers(dest="compare_kind", required=True)
    pipelines = kinds.add_parser(
        "model",
        help="Two serving pipelines on the same images: backends, precisions or response formats.",
        description="A SPEC is comma-separated KEY=VALUE: backend=NAME, format=legacy|coco|polygon|boxes|seed, and "
        "any setting of `serve` by its name (precision=bfloat16, xla=true, max_batch_size=4, ...). Example: "
        "--a backend=tensorpack --b backend=optimized,precision=bfloat16.",
    )
    pipelines.add_argument("--model-dir", default=None, help="Model directory (default: $SM_MODEL_DIR).")
    pipelines.add_argument("--a", required=True, help="Configuration A (SPEC).")
    pipelines.add_argument("--b", required=True, help="Configuration B (SPEC).")
    _add_pipeline_arguments(pipelines)
    pipelines.add_argument("--size", type=_size, default=(640, 480), help="Input size (default 640x480).")
    _add_stream_arguments(pipelines, "Instead of one --size: the N photos of the mixed stream of bench/traffic.py, "
                          "one per round, in order, twice by default; each pass is also reported on its own, with "
                          "each side's load time, and no warm-up by default, so that the first pass is what "
                          "`predict` meets (every size new).")
    pipelines.add_argument("--batch-size", type=int, default=1, help="Images per call (default 1).")
    pipelines.add_argument("--rounds", type=int, default=None,
                           help="Interleaved rounds, at most (default 10; with --stream, 2 x N).")
    pipelines.add_argument("--max-seconds", type=float, default=240.0, help="Seconds of rounds, at most.")
    pipelines.add_argument("--warmup", type=int, default=None,
                           help="Discarded calls per side (default 2; with --stream, 0).")
    _add_output_arguments(pipelines)
    pipelines.set_defaults(func=run_compare_model)

    rle = kinds.add_parser(
        "rle",
        help="Two mask encoders on the same full-size masks: legacy (ours), seed (the seed's groupby), coco.",
    )
    rle.add_argument("--a", default="legacy", help="Encoder A (default legacy, ours).")
    rle.add_argument("--b", default="seed", help="Encoder B (default seed, the seed containers' groupby).")
    rle.add_argument("--masks", type=int, default=100, help="Masks per round (default 100).")
    rle.add_argument("--size", type=_size, default=(640, 480), help="Mask size WIDTHxHEIGHT (default 640x480).")
    rle.add_argument("--rounds", type=int, default=5, help="Interleaved rounds, at most (default 5).")
    rle.add_argument("--max-seconds", type=float, default=120.0, help="Seconds of rounds, at most.")
    rle.add_argument("--json", type=Path, default=None, help="Write the report as JSON here.")
    rle.set_defaults(func=run_compare_rle)


# ----------------------------------------------------------------------------------------------- helpers


def _parse_value(text: str) -> Any:
    from maskrcnn_serving.config import parse_env_value

    return parse_env_value(text)


def _environ(config_overrides: list[tuple[str, str]]) -> dict[str, str]:
    """The process environment plus ``CONFIG__SECTION__KEY`` variables for the --config overrides."""
    environ = dict(os.environ)
    for key, value in config_overrides:
        environ["CONFIG__" + key.replace(".", "__")] = value
    return environ


def _open(settings, environ: dict[str, str], label: str):
    """The pipeline of ``settings`` (limits lifted: the benchmark measures the work and reports responses over the
    server's response limit instead of refusing them)."""
    from maskrcnn_serving.commands import open_pipeline

    print(f"loading {label} from {settings.model_dir or '$SM_MODEL_DIR'} ...", file=sys.stderr, flush=True)
    return open_pipeline(settings, environ=environ)


def _start_runtime() -> float:
    """Import TensorFlow and run one op; return the seconds it took. Both sides of a comparison share this process
    start (the import, the thread pools, oneDNN's set-up): done inside the first side's load, it counted there
    (measured: 2.1 s more for whichever side loaded first)."""
    started = time.perf_counter()
    import tensorflow as tf

    tf.add(tf.zeros([2, 8, 8, 4]), 1.0).numpy()
    return time.perf_counter() - started


def _model_description(pipeline, options: dict, config_overrides: list) -> dict:
    bundle = pipeline.backend.bundle
    return {
        "dir": str(bundle.model_dir),
        "backend": pipeline.backend.name,
        "backend_options": options,
        "compute": pipeline.backend.description,
        "config_overrides": dict(config_overrides),
        "test_short_edge_size": bundle.inference.short_edge_size,
        "max_size": bundle.inference.max_size,
        "resnet_num_blocks": list(bundle.architecture.resnet_num_blocks),
    }


def _write_outputs(report: dict, json_path: Path | None, plot_path: Path | None, plot) -> None:
    from maskrcnn_serving.bench.report import write_json_report

    report.setdefault("command", "maskrcnn-serving " + " ".join(sys.argv[1:]))
    if json_path is not None:
        write_json_report(report, json_path)
        print(f"JSON report: {json_path}")
    if plot_path is None and json_path is not None:
        plot_path = json_path.with_suffix(".png")
    if plot_path is not None and plot is not None:
        try:
            print(f"plot: {plot(report, plot_path)}")
        except RuntimeError as exc:  # matplotlib missing: the JSON and the table are still there
            print(f"warning: no plot: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- commands


def run_model(args: argparse.Namespace) -> int:
    from maskrcnn_serving.bench.images import DEFAULT_SIZES
    from maskrcnn_serving.bench.model import ModelBenchSettings, bench_model
    from maskrcnn_serving.bench.plots import plot_model
    from maskrcnn_serving.bench.report import model_table
    from maskrcnn_serving.bench.stats import machine_info
    from maskrcnn_serving.bench.workload import Workload

    options = dict(args.backend_option)
    if args.precision:
        options["precision"] = args.precision
    settings = settings_from_args(args).with_text(options)
    if args.stream:
        return _run_model_stream(args, settings, options)
    pipeline = _open(settings, _environ(args.config), f"{settings.backend} {options or ''}")
    workload = Workload(pipeline, args.score_threshold, args.detections, args.format)
    bench_settings = ModelBenchSettings(
        sizes=tuple(args.sizes or DEFAULT_SIZES),
        batch_sizes=tuple(args.batch_sizes),
        iterations=args.iterations,
        max_seconds=args.max_seconds,
        max_total_seconds=args.max_total_seconds,
        warmup=args.warmup,
    )

    def progress(result: dict) -> None:
        print(f"  {result['size']} batch {result['batch_size']}: {result['img_per_s']:.2f} img/s "
              f"({result['calls']} calls)", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = bench_model(workload, bench_settings, progress)
    report["model"] = _model_description(pipeline, options, args.config)
    report["model"]["format"] = args.format
    report["detections"] = args.detections
    report["score_threshold"] = args.score_threshold
    report["machine"] = machine_info()
    report["wall_s"] = time.perf_counter() - started
    print(model_table(report["results"]))
    print("stages in ms per image; p50/p90/p99 per call (a call = one request of `batch` images); "
          "non-model = 1 - model/total")
    _write_outputs(report, args.json, args.plot, plot_model)
    return 0


def _run_model_stream(args: argparse.Namespace, settings: Settings, options: dict) -> int:
    """``bench model --stream N``: load, the server's warm-up, then the stream twice (bench/traffic.py)."""
    from maskrcnn_serving.bench.report import stream_table
    from maskrcnn_serving.bench.stats import machine_info
    from maskrcnn_serving.bench.traffic import mixed_stream, run_stream
    from maskrcnn_serving.bench.workload import Workload
    from maskrcnn_serving.server.runtime import warm_up

    photos = mixed_stream(args.stream, args.stream_seed)  # made before the clock starts
    started = time.perf_counter()
    pipeline = _open(settings, _environ(args.config), f"{settings.backend} {options or ''}")
    loaded = time.perf_counter()
    warm_up(pipeline)
    warmed = time.perf_counter()
    print(f"loaded in {loaded - started:.1f} s, warmed up in {warmed - loaded:.1f} s", file=sys.stderr, flush=True)
    workload = Workload(pipeline, args.score_threshold, args.detections, args.format)
    report = run_stream(workload, photos, lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    report["load_s"], report["warmup_s"] = loaded - started, warmed - loaded
    report["wall_incl_load_s"] = report["load_s"] + report["warmup_s"] + report["first_pass"]["wall_s"]
    report["stream"] = {"images": args.stream, "seed": args.stream_seed}
    report["model"] = _model_description(pipeline, options, args.config)
    report["model"]["format"] = args.format
    report["detections"] = args.detections
    report["score_threshold"] = args.score_threshold
    report["machine"] = machine_info()
    print(stream_table(report))
    _write_outputs(report, args.json, None, None)
    return 0


def _read_images(paths: list[Path]) -> list[bytes]:
    from maskrcnn_serving.sources import collect_images

    return [file.read_bytes() for file in collect_images(paths)]


def run_http(args: argparse.Namespace) -> int:
    from maskrcnn_serving.bench import loadgen
    from maskrcnn_serving.bench.images import synthetic_jpegs
    from maskrcnn_serving.bench.plots import plot_http
    from maskrcnn_serving.bench.report import http_table
    from maskrcnn_serving.bench.stats import machine_info
    from maskrcnn_serving.bench.traffic import mixed_stream

    if args.url:
        target = loadgen.HttpTarget(args.url, args.timeout)
    else:
        target = loadgen.SageMakerTarget(args.sagemaker_endpoint, args.region, args.timeout)
    if args.stream:
        images = [photo.jpeg for photo in mixed_stream(args.stream, args.stream_seed)]
    else:
        images = _read_images(args.images) if args.images else synthetic_jpegs(args.size, 8)
    if not images:
        raise SystemExit("error: no images found")
    fields = {key: _parse_value(value) for key, value in args.field}
    bodies = loadgen.build_bodies(images, args.images_per_request, fields, args.raw)
    warm = loadgen.warm_up(target, bodies, args.warmup)
    print(f"{target.description}: warm-up statuses {warm}", file=sys.stderr, flush=True)
    runs = []
    for concurrency in args.concurrency:
        runs.append(loadgen.run_closed(target, bodies, concurrency, args.requests, args.duration))
        print(f"  closed loop c={concurrency}: {runs[-1]['throughput_rps']:.2f} req/s", file=sys.stderr, flush=True)
    for rate in args.rates:
        runs.append(loadgen.run_open(target, bodies, rate, args.requests, args.duration, args.max_in_flight,
                                     args.poisson))
        print(f"  open loop {rate}/s: {runs[-1]['throughput_rps']:.2f} req/s", file=sys.stderr, flush=True)
    report = {
        "target": target.description,
        "images_per_request": args.images_per_request,
        "payload": {
            "images": _payload_description(args),
            "fields": fields,
            "raw": args.raw,
        },
        "warmup_statuses": warm,
        "machine": machine_info(),
        "runs": runs,
    }
    print(http_table(runs))
    print("latency from the scheduled send time (open loop) or the send time (closed loop); successful requests")
    _write_outputs(report, args.json, args.plot, plot_http)
    return 0


def _payload_description(args: argparse.Namespace) -> str | list[str]:
    from maskrcnn_serving.bench.images import format_size

    if args.stream:
        return f"mixed stream of {args.stream} photos, seed {args.stream_seed} (bench/traffic.py)"
    return [str(p) for p in args.images] if args.images else f"synthetic {format_size(args.size)} JPEG"


def _parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """'backend=optimized,precision=bfloat16,format=coco' -> (format, settings as text incl. backend)."""
    values = dict(_key_value(item) for item in text.split(",") if item.strip())
    encoder = values.pop("format", "legacy")
    return encoder, values


def run_compare_model(args: argparse.Namespace) -> int:
    from maskrcnn_serving.bench.compare import compare_pipelines
    from maskrcnn_serving.bench.images import format_size, synthetic_jpegs
    from maskrcnn_serving.bench.plots import plot_compare
    from maskrcnn_serving.bench.report import compare_table
    from maskrcnn_serving.bench.stats import machine_info
    from maskrcnn_serving.bench.traffic import mixed_stream
    from maskrcnn_serving.bench.workload import Workload

    if args.batch_size < 1 or (args.stream and args.stream % args.batch_size):
        raise SystemExit("error: --batch-size must be at least 1, and divide --stream (a pass is whole calls)")
    if args.stream:
        photos = mixed_stream(args.stream, args.stream_seed)  # made before the clock starts
        images, description = [photo.jpeg for photo in photos], _payload_description(args)
    else:
        images, description = synthetic_jpegs(args.size, max(args.batch_size, 4)), format_size(args.size)
    pass_length = args.stream // args.batch_size if args.stream else None
    rounds = args.rounds if args.rounds is not None else (2 * pass_length if pass_length else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.stream else 2)
    environ = _environ(args.config)
    base = Settings.from_env(os.environ, model_dir=args.model_dir)
    process_start_s = _start_runtime()
    loaded: dict[str, Any] = {}
    load_seconds: list[float] = []
    workloads = []
    for spec in (args.a, args.b):
        encoder, values = _parse_spec(spec)
        settings = base.with_text(values)
        key = repr(settings)
        started = time.perf_counter()
        if key not in loaded:  # the same backend and settings on both sides are loaded once
            loaded[key] = _open(settings, environ, spec)
        load_seconds.append(time.perf_counter() - started)
        workloads.append(Workload(loaded[key], args.score_threshold, args.detections, encoder))
    report = compare_pipelines(
        workloads[0], workloads[1], images, description, args.batch_size, rounds, warmup, args.max_seconds,
        labels=(args.a, args.b), pass_length=pass_length,
    )
    report["a"]["load_s"], report["b"]["load_s"] = load_seconds
    report["process_start_s"] = process_start_s
    report["detections"] = args.detections
    report["config_overrides"] = dict(args.config)
    report["model_dir"] = args.model_dir
    report["machine"] = machine_info()
    print(compare_table(report))
    print(f"B/A throughput: {report['throughput_ratio_b_over_a']:.3f}x  ({report['rounds']} interleaved rounds, "
          f"{description}, batch {report['batch_size']}, {args.detections} detections)")
    for index, one in enumerate(report.get("passes", [])):
        with_load = (f"; with each side's load first (A {load_seconds[0]:.1f} s, B {load_seconds[1]:.1f} s; the "
                     f"process start, {process_start_s:.1f} s, shared and not counted): "
                     f"B/A time {(one['b_s'] + load_seconds[1]) / (one['a_s'] + load_seconds[0]):.3f}"
                     if index == 0 else "")
        print(f"pass {index + 1}: A {one['a_s']:.1f} s, B {one['b_s']:.1f} s, B/A time {one['b_s'] / one['a_s']:.3f}"
              + with_load)
    _write_outputs(report, args.json, args.plot, plot_compare)
    return 0


def run_compare_rle(args: argparse.Namespace) -> int:
    from maskrcnn_serving.bench.compare import compare_rle
    from maskrcnn_serving.bench.images import format_size
    from maskrcnn_serving.bench.stats import machine_info

    report = compare_rle(args.a, args.b, args.masks, args.size, args.rounds, args.max_seconds)
    report["machine"] = machine_info()
    a, b = report["a"], report["b"]
    print(f"{args.masks} masks of {format_size(args.size)} ({report['foreground_fraction']:.1%} foreground), "
          f"{report['rounds']} interleaved rounds")
    print(f"  A {a['encoder']:>7}: {a['s_per_mask'] * 1000:.3f} ms per mask")
    print(f"  B {b['encoder']:>7}: {b['s_per_mask'] * 1000:.3f} ms per mask")
    identical = {True: "identical", False: "DIFFERENT", None: "not comparable (different formats)"}
    print(f"  A is {report['speedup_a_over_b']:.1f}x faster than B; outputs {identical[report['identical']]}")
    _write_outputs(report, args.json, None, None)
    return 0 if report["identical"] is not False else 1
