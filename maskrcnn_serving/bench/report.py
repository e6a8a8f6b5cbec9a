"""Plain-text tables of benchmark reports, for people (the JSON is for machines)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from maskrcnn_serving.pipeline import STAGES


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A right-aligned fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def stage_columns(results: Sequence[dict]) -> list[str]:
    present = {name for result in results for name in result["stages_s_per_image"]}
    return [name for name in STAGES if name in present] + sorted(present - set(STAGES))


def model_table(results: Sequence[dict]) -> str:
    """One row per (size, batch): throughput, latency per call, memory, then milliseconds per image by stage."""
    stages = stage_columns(results)
    headers = ["size", "batch", "img/s", "p50 ms", "p90 ms", "p99 ms", "peak MB", "dets"]
    headers += [f"{name} ms" for name in stages] + ["sum ms", "total ms", "non-model"]
    rows = []
    for r in results:
        latency = r["latency_s"]
        per_stage = [_ms(r["stages_s_per_image"].get(name)) for name in stages]
        share = r.get("non_model_share")
        rows.append(
            [r["size"], r["batch_size"], round(r["img_per_s"], 2), _ms(latency["p50"]), _ms(latency["p90"]),
             _ms(latency["p99"]), round(r["peak_rss_mb"]), round(r["detections_per_image"]["mean"], 1)]
            + per_stage
            + [_ms(sum(r["stages_s_per_image"].values())), _ms(r["total_s_per_image"]),
               None if share is None else f"{share:.1%}"]
        )
    return table(headers, rows)


def compare_table(report: dict) -> str:
    """Side A and side B of a pipeline comparison, and the ratio B/A of each figure."""
    a, b = report["a"], report["b"]
    stages = stage_columns([a, b])
    rows = [
        ["img/s", round(a["img_per_s"], 3), round(b["img_per_s"], 3), round(b["img_per_s"] / a["img_per_s"], 3)],
        ["p50 ms", _ms(a["latency_s"]["p50"]), _ms(b["latency_s"]["p50"]),
         round(b["latency_s"]["p50"] / a["latency_s"]["p50"], 3)],
        ["total ms/img", _ms(a["total_s_per_image"]), _ms(b["total_s_per_image"]),
         round(b["total_s_per_image"] / a["total_s_per_image"], 3)],
    ]
    for name in stages:
        sa, sb = a["stages_s_per_image"].get(name), b["stages_s_per_image"].get(name)
        ratio = round(sb / sa, 3) if sa and sb is not None else None
        rows.append([f"{name} ms/img", _ms(sa), _ms(sb), ratio])
    rows.append(["detections/img", a["detections_per_image"]["mean"], b["detections_per_image"]["mean"], None])
    rows.append(["response bytes/img", round(a["response_bytes_per_image"]), round(b["response_bytes_per_image"]),
                 round(b["response_bytes_per_image"] / a["response_bytes_per_image"], 3)])
    return table(["", f"A: {report['a_label']}", f"B: {report['b_label']}", "B/A"], rows)


def http_table(runs: Sequence[dict]) -> str:
    """One row per load level (closed-loop concurrency or open-loop rate)."""
    headers = ["mode", "load", "sent", "ok", "errors", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
               "req KB", "resp KB"]
    rows = []
    for run in runs:
        latency = run["latency_s"]
        load = run["concurrency"] if run["mode"] == "closed" else f"{run['target_rate']}/s"
        errors = ", ".join(f"{k}:{v}" for k, v in sorted(run["status_counts"].items()) if k != "200") or "0"
        rows.append(
            [run["mode"], load, run["sent"], run["ok"], errors, round(run["throughput_rps"], 2),
             round(run["images_per_s"], 2), _ms(latency.get("p50")), _ms(latency.get("p90")),
             _ms(latency.get("p99")), _ms(latency.get("max")), round(run["request_bytes"]["mean"] / 1024, 1),
             round(run["response_bytes"]["mean"] / 1024, 1) if run["response_bytes"] else None]
        )
    return table(headers, rows)


def stream_table(report: dict) -> str:
    """``bench model --stream``: the two passes of the stream, per-image seconds, and what new sizes cost."""
    rows = []
    for name in ("first_pass", "repeat_pass"):
        run = report[name]
        per_image, model = run["s_per_image"], run["model_s_per_image"]
        rows.append([name.replace("_", " "), run["images"], run["wall_s"], per_image["p50"], per_image["p90"],
                     per_image["p99"], per_image["max"], model["p50"], model["p99"]])
    text = table(["pass", "images", "wall s", "p50 s", "p90 s", "p99 s", "max s", "model p50 s", "model p99 s"], rows)
    return (f"{text}\nload {report['load_s']:.1f} s, warm-up {report['warmup_s']:.1f} s; first pass p99/p50 "
            f"{report['p99_over_p50']:.2f}; new sizes cost {report['new_size_share']:.1%} of the first pass; "
            f"load + warm-up + first pass {report['wall_incl_load_s']:.1f} s")


def write_json_report(report: dict, path: Path) -> None:
    """Write a benchmark's report as indented JSON at ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
