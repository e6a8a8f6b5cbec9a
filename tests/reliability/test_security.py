"""The claims of docs/security.md that can be checked from the code, checked (AST scans, not string searches)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "maskrcnn_serving"
# The modules that handle a request's bytes between the socket and the backend.
REQUEST_PATH = ("server/app.py", "server/runtime.py", "server/guards.py", "server/gunicorn_worker.py",
                "server/metrics.py", "server/logs.py", "server/web.py", "pipeline.py", "scheduler.py", "deadline.py",
                "wire.py", "request.py", "postprocess.py", "imaging.py", "errors.py", "encoding.py", "structures.py",
                "settings.py", "booleans.py")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]


def test_no_dynamic_code_execution_or_unsafe_deserialization():
    """No eval/exec/compile, no pickle/marshal/shelve, no shell=True or os.system, no unsafe yaml.load, and every
    np.load refuses pickles. (The seed eval()'d CONFIG__* environment values; config.py uses ast.literal_eval.)"""
    problems = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "marshal", "shelve", "dill") for n in names):
                    problems.append((path.name, node.lineno, "imports a pickle-like module"))
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen"):
                problems.append((path.name, node.lineno, name))
            if isinstance(keywords.get("shell"), ast.Constant) and keywords["shell"].value is True:
                problems.append((path.name, node.lineno, "shell=True"))
            if name == "yaml.load" and "Loader" not in keywords:
                problems.append((path.name, node.lineno, "yaml.load without a safe Loader"))
            if name in ("np.load", "numpy.load"):
                allow = keywords.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append((path.name, node.lineno, "np.load without allow_pickle=False"))
    assert problems == []


def test_request_path_never_opens_files():
    """Nothing between the socket and the backend opens a file whose name is not a constant: images are decoded in
    memory (the seed wrote each upload to a temp file, once under the client's img_id)."""
    opening = {"open", "io.open", "Path", "pathlib.Path", "os.open", "tempfile.NamedTemporaryFile",
               "tempfile.mkstemp", "tempfile.TemporaryFile", "NamedTemporaryFile", "cv2.imread", "Image.open"}
    problems = []
    for name in REQUEST_PATH:
        path = PACKAGE / name
        assert path.is_file(), name  # the list follows the package
        for call in _calls(path):
            if _call_name(call) not in opening:
                continue
            first = call.args[0] if call.args else None
            constant = isinstance(first, ast.Constant) and isinstance(first.value, str)
            in_memory = isinstance(first, ast.Call) and _call_name(first) in ("io.BytesIO", "BytesIO")
            if not (constant or in_memory):
                problems.append((name, call.lineno, _call_name(call)))
    assert problems == []


def test_every_dependency_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    unpinned = [r for r in requirements if not any(s.operator == "==" for s in Requirement(r).specifier)]
    assert unpinned == []


def test_lock_file_is_current_and_used_by_the_images():
    """requirements-lock.txt (direct + transitive runtime dependencies) matches pyproject.toml and this environment,
    and every serving image installs with it as constraints."""
    result = subprocess.run([sys.executable, str(REPO / "build_tools" / "lock_runtime_deps.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    locked = dict(line.split("==") for line in (REPO / "requirements-lock.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        pinned = next(s.version for s in requirement.specifier if s.operator == "==")
        assert locked[requirement.name.lower().replace("_", "-")] == pinned, requirement
    for dockerfile in sorted(REPO.glob("container-serving*/Dockerfile")):
        # an image built on the serving image (FROM ${SERVING_IMAGE}) has what that image installed
        source = REPO / "container-serving" / "Dockerfile" if "FROM ${SERVING_IMAGE}" in dockerfile.read_text() \
            else dockerfile
        assert "pip install -c requirements-lock.txt ." in source.read_text(), dockerfile


def test_error_bodies_carry_no_internal_details():
    """Error messages are capped in size, and no module formats a traceback for a response (the one 500 path
    answers with a request id; tests/server/test_app.py checks it on a real fault)."""
    from maskrcnn_serving.errors import MAX_MESSAGE_CHARS, error_body

    assert len(error_body("invalid_request", "x" * (10 * MAX_MESSAGE_CHARS))) < MAX_MESSAGE_CHARS + 200
    for name in REQUEST_PATH:
        path = PACKAGE / name
        assert path.is_file(), name  # the list follows the package
        if path.is_file():
            assert "format_exc" not in path.read_text() and "print_exc" not in path.read_text(), name
