"""The notebooks: both are valid nbformat with code that parses; the local one is executed end to end (it starts a
real server on the demo model, queries it and stops it), so it cannot rot."""

from __future__ import annotations

import ast
import os
import re
import signal
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the dev extras install nbformat, nbclient and ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LOCAL = NOTEBOOKS / "local-inference.ipynb"
SAGEMAKER = NOTEBOOKS / "mask-rcnn-inference.ipynb"
SEARCH = NOTEBOOKS / "instance-search.ipynb"
CELL_TIMEOUT = 300  # seconds per cell; the notebook bounds its own wait for /ping to 300 s as well


@pytest.mark.parametrize("path", [LOCAL, SAGEMAKER, SEARCH], ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_parses(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert not cell.outputs and cell.execution_count is None, "commit notebooks without outputs"
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        ast.parse(source)


def _server_pids(notebook) -> list[int]:
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    return [int(pid) for pid in re.findall(r"server pid (\d+)", text)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_inference_notebook_runs():
    from nbclient import NotebookClient

    notebook = nbformat.read(LOCAL, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    started = time.monotonic()
    try:
        client.execute()
    finally:
        # Whatever happened, no server may outlive the test: the notebook prints its pid and runs it in its own
        # process group.
        leftovers = [pid for pid in _server_pids(notebook) if _alive(pid)]
        for pid in leftovers:
            os.killpg(pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    assert _server_pids(notebook), "the notebook did not report its server"
    assert not leftovers, "the notebook left its server running"

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3, "expected the legacy, multi-image and polygon plots"
    text = "".join(o.get("text", "") for o in outputs)
    assert "legacy and coco masks are identical" in text
    assert "server exit code 0" in text
    print(f"local-inference.ipynb executed in {seconds:.1f} s")


def test_instance_search_notebook_runs():
    from nbclient import NotebookClient

    notebook = nbformat.read(SEARCH, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2, "expected the neighbours figure and the embedding map"
    text = "".join(o.get("text", "") for o in outputs)
    assert "(0 images already indexed" in text and "0 instances from 0 images added" in text  # built, then resumed
    assert "at distance" in text and "instances on the map" in text and "instances written to" in text
