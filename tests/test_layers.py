"""The house drawn from the imports: every module of the package is in one layer and imports only from its own layer
and the layers below. The layers are the numbered list under "## Layers" in docs/architecture.md, read here, so the
order is written once. Every import counts: at the top of a module, inside a function, under ``TYPE_CHECKING``.

Also: the product never imports test material, and pip does not install it."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "maskrcnn_serving"
ROOT = "__init__"  # the package's own __init__.py: below everything (every import of a submodule runs it first)
ARCHITECTURE = REPO / "docs" / "architecture.md"
TEST_MATERIAL = ("testsupport", "tests", "conftest")


def documented_layers(text: str) -> list[tuple[str, ...]]:
    """The names of each numbered item (bottom layer first) of the "## Layers" section: the backticked names before
    the item's colon, e.g. ``1. `errors`, `settings`: ...``."""
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{ARCHITECTURE.name} has no '## Layers' section"
    items = re.findall(r"^\d+\. (.+?):", section.group(1), re.M)
    assert items, "the '## Layers' section has no numbered list"
    return [tuple(re.findall(r"`([\w.]+)`", item)) for item in items]


def _top_level_names(package_dir: Path) -> set[str]:
    """The package's modules and subpackages by the name imports use after ``maskrcnn_serving.``."""
    names = {p.stem for p in package_dir.glob("*.py") if p.name != "__init__.py"}
    return names | {p.name for p in package_dir.iterdir() if (p / "__init__.py").is_file()}


def _imported(node: ast.AST, module: list[str], is_package: bool, names: set[str]) -> Iterable[tuple[str, str]]:
    """(top-level name, module) of what an import statement imports: for the package, the name after
    ``maskrcnn_serving.`` (``ROOT`` for the package itself or an attribute of its ``__init__``); else the first
    component."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, ``level`` packages up
            base = module[: len(module) - node.level + (1 if is_package else 0)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        targets = [stem] if stem.count(".") > 1 else [f"{stem}.{alias.name}" for alias in node.names]
    else:
        return
    for target in sorted(set(targets)):
        parts = target.split(".")
        if parts[0] != PACKAGE:
            yield parts[0], target
        elif len(parts) > 1 and parts[1] in names:
            yield parts[1], target
        else:
            yield ROOT, PACKAGE


def layer_violations(sources: Mapping[str, str], layers: list[tuple[str, ...]], names: set[str]) -> list[str]:
    """Every import that runs upward or takes test material, as ``path:line: ...``; ``sources``: the text of each
    module by its path from the repository root (``maskrcnn_serving/...``); ``names``: the package's top-level
    modules and subpackages."""
    layer_of = {name: index for index, layer in enumerate(layers) for name in layer}
    problems = []
    for path, text in sorted(sources.items()):
        parts = Path(path).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = list(parts[:-1] if is_package else parts)
        own = module[1] if len(module) > 1 else ROOT
        if own not in layer_of:
            problems.append(f"{path}: `{own}` is in no layer: add it to the list in docs/architecture.md")
            continue
        for node in ast.walk(ast.parse(text, path)):
            for target, imported in _imported(node, module, is_package, names):
                if target in TEST_MATERIAL:
                    problems.append(f"{path}:{node.lineno}: imports test material ({imported})")
                elif target in layer_of and layer_of[target] > layer_of[own]:
                    problems.append(f"{path}:{node.lineno}: `{own}` (layer {layer_of[own] + 1}) imports {imported} "
                                    f"(`{target}`, layer {layer_of[target] + 1}: above it)")
    return problems


def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def test_no_import_runs_up_the_layers():
    layers = documented_layers(ARCHITECTURE.read_text())
    names = _top_level_names(REPO / PACKAGE)
    listed = [name for layer in layers for name in layer]
    assert sorted(set(listed)) == sorted(listed), "a name is in two layers"
    assert set(listed) - {ROOT} <= names, f"no such module: {sorted(set(listed) - {ROOT} - names)}"
    problems = layer_violations(_package_sources(), layers, names)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_check_sees_an_upward_import_wherever_it_is():
    """The check itself: an upward import at the top, inside a function, relative, or of the package's attribute
    (and a downward one that is fine)."""
    layers = [(ROOT, "settings"), ("modeling",), ("backends",)]
    names = {"settings", "modeling", "backends"}
    sources = {
        "maskrcnn_serving/settings.py": "import os\n\n\ndef f():\n    from maskrcnn_serving.backends import base\n",
        "maskrcnn_serving/modeling/net.py": "from ..backends.base import Backend\n"
                                            "from maskrcnn_serving import settings\n",
        "maskrcnn_serving/backends/base.py": "import maskrcnn_serving.modeling.net\nfrom maskrcnn_serving import x\n",
        "maskrcnn_serving/backends/__init__.py": "from .base import Backend\nimport testsupport.server\n",
        "maskrcnn_serving/other.py": "",
    }
    assert layer_violations(sources, layers, names) == [
        "maskrcnn_serving/backends/__init__.py:2: imports test material (testsupport.server)",
        "maskrcnn_serving/modeling/net.py:1: `modeling` (layer 2) imports maskrcnn_serving.backends.base (`backends`, "
        "layer 3: above it)",
        "maskrcnn_serving/other.py: `other` is in no layer: add it to the list in docs/architecture.md",
        "maskrcnn_serving/settings.py:5: `settings` (layer 1) imports maskrcnn_serving.backends.base (`backends`, "
        "layer 3: above it)",
    ]


def test_pip_installs_no_test_material():
    """pyproject.toml's package list is the product; the test-support package is beside it, not in it."""
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = setuptools.find_packages(str(REPO), include=include)
    assert PACKAGE in installed and (REPO / "testsupport" / "__init__.py").is_file()
    assert not [name for name in installed if name.split(".")[0] != PACKAGE], installed
    assert not [name for name in installed if set(name.split(".")) & {"testsupport", "tests"}], installed
