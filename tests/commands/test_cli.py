"""The ``maskrcnn-serving`` entry point: load errors, and TensorFlow's native start-up noise kept out of sight."""

from maskrcnn_serving import cli, native_stderr


def test_cli_reports_load_errors(tmp_path, example_images, capsys):
    args = ["predict", "--model-dir", str(tmp_path), str(example_images[0]), "--output", str(tmp_path / "o.json")]
    code = cli.main(args)
    assert code == 2
    assert "No checkpoint in" in capsys.readouterr().err


def test_native_stderr_is_captured_while_python_stderr_reaches_the_terminal(capfd):
    import os
    import sys

    before = sys.stderr
    with native_stderr.native_stderr_captured() as native_tail:
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")  # what TensorFlow's C++ code does
        print("predict: 100%", file=sys.stderr)
        assert "oneDNN" in native_tail()
    assert sys.stderr is before  # put back
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "predict: 100%" in err and "after" in err and "oneDNN" not in err


def test_predict_is_quiet_by_default_and_verbose_on_request(demo_model_dir, example_images, tmp_path):
    """A real run in a fresh process (TensorFlow prints its start-up notices once per process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "maskrcnn_serving.cli", "predict", "--model-dir", str(demo_model_dir),
               str(example_images[0]), "--output", str(tmp_path / "r.json")]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "predict" in quiet.stderr and "detections in 1 images" in quiet.stdout  # our progress and messages
    for noise in ("oneDNN", "cuInit", "absl::InitializeLog", "cuda drivers"):
        assert noise not in quiet.stderr, quiet.stderr
    verbose = subprocess.run([*command[:3], "--verbose", *command[3:]], env=env, capture_output=True, text=True,
                             timeout=300, check=True)
    assert "oneDNN" in verbose.stderr or "absl::InitializeLog" in verbose.stderr, verbose.stderr
