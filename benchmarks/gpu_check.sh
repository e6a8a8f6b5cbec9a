#!/usr/bin/env bash
# One command for a machine with a GPU: check that TensorFlow sees it, evaluate both fixtures with both backends and
# every precision, run the `bench compare model` set, measure the GPU memory of 1, 2 and 4 server workers, and write
# one JSON report plus a short Markdown table (docs/benchmarks.md says what to send back).
#
#   benchmarks/gpu_check.sh [--out DIR] [--fixtures DIR]     on a GPU machine (refuses without a GPU)
#   benchmarks/gpu_check.sh --cpu-dry-run [--out DIR]          the same steps at tiny sizes on CPU (tests run this)
#
# Environment: MASKRCNN_SERVING (the command, default maskrcnn-serving), PYTHON (default python3).
# Every step runs even when an earlier one failed; each step's exit status is in the report, and the script exits 1
# if any step failed.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SERVING="${MASKRCNN_SERVING:-maskrcnn-serving}"
PY="${PYTHON:-python3}"
OUT="gpu-check-$(date +%Y%m%d-%H%M%S)"
FIXTURES="$REPO/../shared/fixtures"
DRY_RUN=0

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --fixtures) FIXTURES="${2:?--fixtures needs a folder}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

ANNOTATIONS="$FIXTURES/val_public/annotations.json"
IMAGES="$FIXTURES/val_public/images"
if [[ ! -f "$ANNOTATIONS" ]]; then
    echo "error: no fixtures at $FIXTURES (val_public/annotations.json); pass --fixtures DIR" >&2
    exit 2
fi

if [[ "$DRY_RUN" == 1 ]]; then
    # Tiny sizes so that every step runs on a CPU in about two minutes: the bundled demo model, small inputs, few
    # proposals (TF 2.21's fused float16 MatMul on CPU is very slow), two images per eval, one round per compare.
    MODELS=("$REPO/model/demo")
    EVAL_LIMIT=(--limit 2)
    BENCH_CONFIG=()
    BATCH_SIZES=(1 2)
    XLA_BATCH_SIZES=(1)
    WORKER_COUNTS=(1 2)
    ROUNDS=(--rounds 1 --warmup 1 --detections 10)
    SERVE_ENV=()
    MEMORY_POLL_SECONDS=1  # the dry run checks that the step works, not the figure: poll faster
    export CONFIG__PREPROC__TEST_SHORT_EDGE_SIZE=128 CONFIG__PREPROC__MAX_SIZE=192
    export CONFIG__RPN__TEST_PER_LEVEL_NMS_TOPK=64
else
    MODELS=("$FIXTURES/shapes-demo" "$FIXTURES/shapes-r50fpn")
    EVAL_LIMIT=()
    BENCH_CONFIG=(--config PREPROC.TEST_SHORT_EDGE_SIZE=800 --config PREPROC.MAX_SIZE=1333)  # the COCO test size
    BATCH_SIZES=(1 2 4 8)
    XLA_BATCH_SIZES=(1 2 4 8)
    WORKER_COUNTS=(1 2 4)
    ROUNDS=(--rounds 10)
    SERVE_ENV=(CONFIG__PREPROC__TEST_SHORT_EDGE_SIZE=800 CONFIG__PREPROC__MAX_SIZE=1333)
    MEMORY_POLL_SECONDS=2
fi
PRECISIONS=(float32 float16 bfloat16 mixed)
BENCH_MODEL="${MODELS[${#MODELS[@]}-1]}"  # the largest model: R50-FPN on a GPU

# ----------------------------------------------------------------------------------------------------- the GPU
if [[ "$DRY_RUN" == 0 ]] && { ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; }; then
    echo "error: no GPU here: nvidia-smi is missing or lists no GPU. Run this on a GPU instance, or use" \
        "--cpu-dry-run to try the steps on CPU." >&2
    exit 3
fi
gpu_count="$("$PY" -c 'import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2> /dev/null ||
    echo 0)"
if [[ "$DRY_RUN" == 0 ]]; then
    if [[ "$gpu_count" -lt 1 ]]; then
        echo "error: nvidia-smi lists a GPU but TensorFlow does not (tf.config.list_physical_devices('GPU') is" \
            "empty): check the CUDA libraries that the tensorflow wheel needs and the driver version." >&2
        exit 3
    fi
fi
# Nothing is written before the checks above: a refused run leaves no report behind.
mkdir -p "$OUT/eval" "$OUT/compare" "$OUT/memory" "$OUT/logs"
STEPS="$OUT/steps.tsv"  # kind, name, exit status, seconds, result file
: > "$STEPS"
if [[ "$DRY_RUN" == 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
else
    echo "cpu-dry-run: no GPU needed; GPU memory is replaced by the workers' resident memory" > "$OUT/gpu.txt"
fi
echo "TensorFlow GPUs: $gpu_count; $(cat "$OUT/gpu.txt")"

# run_step KIND NAME RESULT_FILE COMMAND...: run one step, log it, record its status; never stops the script.
run_step() {
    local kind="$1" name="$2" result="$3"
    shift 3
    local log="$OUT/logs/$kind-$name.log" started status
    started="$(date +%s)"
    echo "[$(date +%T)] $kind $name"
    set +e
    "$@" > "$log" 2>&1
    status=$?
    set -e
    if [[ "$kind" == eval && "$status" == 0 ]]; then
        grep '^{' "$log" | tail -n 1 > "$result"  # eval prints its JSON summary last
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$kind" "$name" "$status" "$(($(date +%s) - started))" "$result" >> "$STEPS"
    [[ "$status" == 0 ]] || echo "    failed (exit $status), see $log"
}

# ----------------------------------------------------------------------------------------------------- eval
for model in "${MODELS[@]}"; do
    tag="$(basename "$model")"
    run_step eval "$tag-tensorpack" "$OUT/eval/$tag-tensorpack.json" \
        "$SERVING" eval --backend tensorpack --model-dir "$model" --annotations "$ANNOTATIONS" --images "$IMAGES" \
        "${EVAL_LIMIT[@]}"
    for precision in "${PRECISIONS[@]}"; do
        run_step eval "$tag-optimized-$precision" "$OUT/eval/$tag-optimized-$precision.json" \
            env MASKRCNN_PRECISION="$precision" "$SERVING" eval --backend optimized --model-dir "$model" \
            --annotations "$ANNOTATIONS" --images "$IMAGES" "${EVAL_LIMIT[@]}"
    done
done

# ----------------------------------------------------------------------------------------------------- compare
compare() {  # compare NAME A B BATCH
    run_step compare "$1" "$OUT/compare/$1.json" "$SERVING" bench compare model --model-dir "$BENCH_MODEL" \
        --a "$2" --b "$3" --batch-size "$4" "${ROUNDS[@]}" "${BENCH_CONFIG[@]}" --json "$OUT/compare/$1.json"
}
compare tensorpack-vs-optimized backend=tensorpack backend=optimized,precision=float32 1
for batch in "${BATCH_SIZES[@]}"; do
    compare "float32-vs-float16-b$batch" backend=optimized,precision=float32 backend=optimized,precision=float16 \
        "$batch"
done
for batch in "${XLA_BATCH_SIZES[@]}"; do
    compare "xla-off-vs-on-b$batch" backend=optimized,precision=float16,xla=false \
        backend=optimized,precision=float16,xla=true "$batch"
done

# ----------------------------------------------------------------------------------------------------- memory
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gpu_used_mb() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | awk '{s += $1} END {print s}'; }
# The workers are the children of the gunicorn master, which is the child of `serve` started with --run-gunicorn
# (beside nginx); a `serve` from before that was the gunicorn master itself.
workers_rss_mb() {
    local master
    master="$(pgrep -P "$1" -f -- --run-gunicorn | head -n 1)"
    ps -o rss= --ppid "${master:-$1}" | awk '{s += $1} END {printf "%d\n", s / 1024}'
}

# measure_workers N: serve the benchmark model with N workers (optimized, mixed precision), warm every worker
# with requests, and record the memory once it stops growing. Writes memory/workers-N.json.
measure_workers() {
    local workers="$1" port pid baseline reading previous=-1 stable=0 waited=0
    port="$(free_port)"
    baseline=0
    [[ "$DRY_RUN" == 1 ]] || baseline="$(gpu_used_mb)"
    env "${SERVE_ENV[@]}" MASKRCNN_PRECISION=mixed "$SERVING" serve --backend optimized --model-dir "$BENCH_MODEL" \
        --host 127.0.0.1 --port "$port" --workers "$workers" > "$OUT/logs/serve-$workers.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/ping" > /dev/null; do
        if ! kill -0 "$pid" 2> /dev/null || [[ "$waited" -ge 600 ]]; then
            echo "    the server did not become ready, see $OUT/logs/serve-$workers.log"
            kill "$pid" 2> /dev/null || true
            wait "$pid" 2> /dev/null || true
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    local requests=()
    for _ in $(seq $((2 * workers))); do
        curl -s -o /dev/null -H 'Content-Type: image/jpeg' --data-binary "@$REPO/examples/images/1001_00003.jpg" \
            "http://127.0.0.1:$port/invocations" &
        requests+=($!)
    done
    for request in "${requests[@]}"; do wait "$request" || true; done
    # Every worker loads and warms up on its own: wait until the reading holds still (within 2%) for two polls.
    for _ in $(seq 60); do
        if [[ "$DRY_RUN" == 1 ]]; then reading="$(workers_rss_mb "$pid")"; else reading="$(gpu_used_mb)"; fi
        if awk -v a="$reading" -v b="$previous" 'BEGIN {exit !(b > 0 && a <= b * 1.02 && a >= b * 0.98)}'; then
            stable=$((stable + 1))
        else
            stable=0
        fi
        [[ "$stable" -ge 2 ]] && break
        previous="$reading"
        sleep "$MEMORY_POLL_SECONDS"
    done
    kill "$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
    local kind=gpu_memory_used_mb
    [[ "$DRY_RUN" == 0 ]] || kind=workers_rss_mb
    printf '{"workers": %s, "%s": %s, "baseline_mb": %s}\n' "$workers" "$kind" "$reading" "$baseline" \
        > "$OUT/memory/workers-$workers.json"
}
for workers in "${WORKER_COUNTS[@]}"; do
    run_step memory "workers-$workers" "$OUT/memory/workers-$workers.json" measure_workers "$workers"
done

# ----------------------------------------------------------------------------------------------------- report
"$PY" - "$OUT" "$DRY_RUN" <<'PYTHON'
"""Gather the steps' results into report.json and report.md."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import tensorflow as tf

out, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"


def read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    kind, name, status, seconds, result = line.split("\t")
    steps.append({"kind": kind, "name": name, "exit_status": int(status), "seconds": int(seconds),
                  "result": read(result) if int(status) == 0 else None})
try:
    cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
except (OSError, StopIteration):
    cpu = platform.processor()
report = {
    "mode": "cpu-dry-run" if dry_run else "gpu",
    "machine": {"gpu": (out / "gpu.txt").read_text().strip(), "cpu": cpu, "tensorflow": tf.__version__,
                "tensorflow_gpus": len(tf.config.list_physical_devices("GPU")), "python": platform.python_version()},
    "steps": steps,
    "failed_steps": [s["name"] for s in steps if s["exit_status"] != 0],
}
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

lines = [f"# gpu_check ({report['mode']}): {report['machine']['gpu']}", "",
         "| eval | bbox AP | segm AP | images | seconds |", "|---|---|---|---|---|"]
for s in steps:
    if s["kind"] == "eval":
        r = s["result"] or {}
        ap = (f"{r['bbox']['AP']:.4f} | {r['segm']['AP']:.4f} | {r['images']} | {r['seconds']}" if r
              else f"failed (exit {s['exit_status']}) | | |")
        lines.append(f"| {s['name']} | {ap} |")
lines += ["", "| compare (B vs A) | batch | A img/s | B img/s | B/A throughput |", "|---|---|---|---|---|"]
for s in steps:
    if s["kind"] == "compare":
        r = s["result"]
        lines.append(f"| {s['name']} | {r['batch_size']} | {r['a']['img_per_s']:.2f} | {r['b']['img_per_s']:.2f} | "
                     f"{r['throughput_ratio_b_over_a']:.2f}x |" if r else f"| {s['name']} | failed | | | |")
kind = "workers' RSS MB (dry run)" if dry_run else "GPU memory used MB (baseline)"
lines += ["", f"| workers | {kind} |", "|---|---|"]
for s in steps:
    if s["kind"] == "memory":
        r = s["result"] or {}
        value = r.get("workers_rss_mb", r.get("gpu_memory_used_mb", "failed"))
        lines.append(f"| {s['name'].split('-')[1]} | {value}" + (f" ({r['baseline_mb']})" if not dry_run and r else "")
                     + " |")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nreport: {out / 'report.json'} and {out / 'report.md'}")
sys.exit(1 if report["failed_steps"] else 0)
PYTHON
