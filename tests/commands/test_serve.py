"""``maskrcnn-serving serve``: settings from flags and environment, the workers' environment, refusing a model
directory it cannot load."""

import subprocess
import sys

import pytest

from maskrcnn_serving import cli
from maskrcnn_serving.commands import serve
from maskrcnn_serving.server import process
from maskrcnn_serving.settings import Settings


def _args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_flags_win_over_the_environment_and_reach_the_workers():
    environ = {"MODEL_SERVER_WORKERS": "3", "MODEL_SERVER_TIMEOUT": "30", "MASKRCNN_PRECISION": "bfloat16",
               "SM_MODEL_DIR": "/opt/ml/model"}
    settings = serve.resolve_settings(_args("--workers", "2", "--max-image-pixels", "1000", "--xla", "on",
                                            "--model-dir", "/models/a"), environ)
    assert (settings.workers, settings.timeout, settings.precision, settings.max_image_pixels) == (2, 30, "bfloat16",
                                                                                                  1000)
    assert settings.xla is True and settings.model_dir == "/models/a"
    assert settings.deadline_seconds == 27.0  # 90 % of the timeout
    env = process.worker_environment(settings, environ)
    assert Settings.from_env(env) == settings  # what each worker reads back after the fork
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"  # workers sharing a GPU never take all of it
    assert "TF_FORCE_GPU_ALLOW_GROWTH" not in process.worker_environment(settings,
                                                                         {"TF_FORCE_GPU_ALLOW_GROWTH": "false"})


def test_malformed_settings_are_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit):
        _args("--workers", "two")
    assert serve.run(_args("--max-images", "0", "--model-dir", "/nowhere")) == 2
    assert "max_images must be >= 1" in capsys.readouterr().err


def test_serve_refuses_a_model_dir_it_cannot_load(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_serving.cli", "serve", "--model-dir", str(tmp_path), "--host", "127.0.0.1",
         "--port", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "cannot load the model" in result.stderr and str(tmp_path) in result.stderr


def test_serve_refuses_a_bucket_step_the_network_cannot_take(demo_model_dir):
    """The rule is the optimized backend's, and ``serve`` checks it before it starts anything."""
    result = subprocess.run(
        [sys.executable, "-m", "maskrcnn_serving.cli", "serve", "--model-dir", str(demo_model_dir), "--backend",
         "optimized", "--bucket-step", "48", "--host", "127.0.0.1", "--port", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert "bucket_step must be a positive multiple of 32, got 48" in result.stderr
