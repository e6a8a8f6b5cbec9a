"""PNG figures of benchmark reports (matplotlib with the non-interactive Agg backend; ``pip install .[bench]``)."""

from __future__ import annotations

from pathlib import Path

from maskrcnn_serving.bench.report import stage_columns

# One fixed colour per stage, so figures of different runs read the same way.
STAGE_COLOURS = {
    "decode": "#4e79a7", "preprocess": "#59a14f", "queue": "#bab0ac", "model": "#e15759", "postprocess": "#f28e2b",
    "encode": "#edc948",
}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("PNG plots need matplotlib: pip install 'maskrcnn-serving[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stacked_stages(ax, labels: list[str], results: list[dict]) -> None:
    """Horizontal stacked bars of milliseconds per image by stage, one bar per result."""
    stages = stage_columns(results)
    left = [0.0] * len(results)
    for name in stages:
        values = [r["stages_s_per_image"].get(name, 0.0) * 1000 for r in results]
        ax.barh(labels, values, left=left, label=name, color=STAGE_COLOURS.get(name))
        left = [a + b for a, b in zip(left, values, strict=True)]
    for y, r in enumerate(results):
        ax.text(left[y], y, f" {r['total_s_per_image'] * 1000:.0f} ms", va="center", fontsize=8)
    ax.set_xlabel("milliseconds per image")
    ax.set_xlim(0, max(left) * 1.15)
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncol=len(stages), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)


def plot_model(report: dict, path: Path) -> Path:
    """Stage breakdown per (size, batch) and throughput with latency percentiles."""
    plt = _pyplot()
    results = report["results"]
    labels = [f"{r['size']} b{r['batch_size']}" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.6 + 0.55 * len(results)), width_ratios=[3, 2])
    _stacked_stages(left, labels, results)
    left.set_title("Where the time goes (per image)", pad=24)
    right.barh(labels, [r["img_per_s"] for r in results], color="#76b7b2")
    for y, r in enumerate(results):
        lat = r["latency_s"]
        right.text(r["img_per_s"], y, f" p50 {lat['p50'] * 1000:.0f} / p99 {lat['p99'] * 1000:.0f} ms",
                   va="center", fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("images per second")
    right.set_title("Throughput (latency per call)")
    right.set_xlim(0, max(r["img_per_s"] for r in results) * 1.9)
    fig.suptitle(_title(report), fontsize=10)
    return _save(fig, path, plt)


def plot_compare(report: dict, path: Path) -> Path:
    """A and B of a pipeline comparison, stage by stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.0))
    _stacked_stages(ax, [f"A: {report['a_label']}", f"B: {report['b_label']}"], [report["a"], report["b"]])
    ax.set_title(f"B/A throughput {report['throughput_ratio_b_over_a']:.2f}x  ({report['images']}, batch "
                 f"{report['batch_size']}, {report['rounds']} interleaved rounds)", fontsize=10, pad=24)
    return _save(fig, path, plt)


def plot_http(report: dict, path: Path) -> Path:
    """Latency percentiles against achieved throughput, closed-loop sweep and open-loop runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, marker, style in (("closed", "o", "-"), ("open", "s", "--")):
        runs = [r for r in report["runs"] if r["mode"] == mode and r["latency_s"]]
        if not runs:
            continue
        x = [r["throughput_rps"] for r in runs]
        for percentile, colour in (("p50", "#4e79a7"), ("p90", "#f28e2b"), ("p99", "#e15759")):
            ax.plot(x, [r["latency_s"][percentile] * 1000 for r in runs], marker=marker, linestyle=style,
                    color=colour, label=f"{mode} loop {percentile}")
        for r, xv in zip(runs, x, strict=True):
            tag = f"c={r['concurrency']}" if mode == "closed" else f"{r['target_rate']}/s"
            ax.annotate(tag, (xv, r["latency_s"]["p50"] * 1000), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    ax.set_xlabel("achieved throughput (successful requests per second)")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['target']}  ({report['images_per_request']} image(s) per request)", fontsize=10)
    return _save(fig, path, plt)


def _title(report: dict) -> str:
    model = report.get("model", {})
    parts = [model.get("backend", ""), model.get("dir", ""),
             f"resize {model.get('test_short_edge_size')}/{model.get('max_size')}",
             f"format={model.get('format', '')}", f"{report.get('detections', '')} detections"]
    machine = report.get("machine", {})
    if machine:
        parts.append(f"{machine.get('cpus')} CPUs, GPUs: {len(machine.get('gpus', [])) or 'none'}")
    return "  |  ".join(str(p) for p in parts if p)


def _save(fig, path: Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
