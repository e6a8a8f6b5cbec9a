"""Instance indexes the server tests build: example images copied into a folder of their own and indexed with the
real ``index build`` command."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from maskrcnn_serving import cli
from maskrcnn_serving.search import database


def build_index(folder: Path, images: Sequence[Path], model_dir: Path, dbs: Sequence[str],
                collection: str = "instances") -> Path:
    """Copy ``images`` into ``folder`` (made here) and index it into each of ``dbs``; then stop the database
    processes this process started, so that a server can take a local database over. Returns ``folder``."""
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    for db in dbs:
        assert cli.main(["index", "build", "--model-dir", str(model_dir), "--db", db, "--collection", collection,
                         str(folder)]) == 0
    database.stop_local_servers()
    return folder
