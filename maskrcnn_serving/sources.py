"""The image files a command runs over: local files and folders, or URLs of a filesystem pyarrow reads (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``, ``file://``; see https://arrow.apache.org/docs/python/filesystems.html).

Every file of a run has a **name**: its path relative to the inputs' common folder, ``/``-separated (``a.jpg``,
``sub/a.jpg``). It is what ``index build`` stores and answers with, so that no absolute path of the machine that
built an index reaches a client, and what ``predict --vis-dir`` writes under. Files are read only when the pipeline
decodes them (:meth:`ImageFile.read_bytes`), wherever that runs: in this process, or in a Ray actor on another node.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def is_url(text: str) -> bool:
    """Whether an input names a file or folder by URL (``scheme://...``) rather than a local path."""
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1 and scheme.isascii() and scheme.replace("+", "").isalnum()


@dataclass(frozen=True)
class ImageFile:
    """One image file of a run.

    location: as the inputs named it (a path as typed, relative or not, or a URL): ``predict``'s ``image_id``.
    name: its path relative to the inputs' common folder (``/``-separated, never absolute).
    source: where to read it from any process: an absolute local path, or the URL.
    """

    location: str
    name: str
    source: str

    def __str__(self) -> str:  # the pipeline's img_id of a file (Pipeline.run_files)
        return self.location

    def read_bytes(self) -> bytes:
        if is_url(self.source):
            filesystem, path = _filesystem(self.source)
            with filesystem.open_input_stream(path) as stream:
                return stream.read()
        return Path(self.source).read_bytes()

    @property
    def absolute_path(self) -> str | None:
        """The resolved local path (what index builds stored before names were relative); None for a URL."""
        return None if is_url(self.source) else str(Path(self.source).resolve())


def collect_images(inputs: Sequence[str | Path]) -> list[ImageFile]:
    """Image files named directly or found under folders (recursively, by suffix), in a stable order, each once.
    Local inputs and URLs are not mixed in one run, nor URLs of two schemes (their names could not share a
    folder). SystemExit for an input that does not exist."""
    texts = [str(item) for item in inputs]
    schemes = {urlsplit(text).scheme if is_url(text) else "" for text in texts}
    if len(schemes) > 1:
        raise SystemExit("error: give local files and folders, or URLs of one scheme, not several kinds in one run")
    found = [_list_url(text) if is_url(text) else _list_local(text) for text in texts]
    common = posixpath.commonpath([root for root, _ in found])
    files: dict[str, ImageFile] = {}
    for _, listed in found:
        for location, source, path in listed:
            files.setdefault(source, ImageFile(location, posixpath.relpath(path, common), source))
    return list(files.values())


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _list_local(item: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(the folder names are relative to, [(location, source, path)]) of a local file or folder: the source and
    the path are the file's absolute path, symbolic links kept (a link inside the folder is named inside it)."""
    path = Path(item)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if _is_image(p.name) and p.is_file())
        return _absolute(path), [(str(p), _absolute(p), _absolute(p)) for p in found]
    if path.is_file():
        return posixpath.dirname(_absolute(path)), [(item, _absolute(path), _absolute(path))]
    raise SystemExit(f"error: {item} does not exist")


def _absolute(path: Path) -> str:
    return Path(os.path.abspath(path)).as_posix()


def _list_url(url: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(the folder names are relative to, [(URL, URL, path)]) of a file or folder URL, the paths being the URLs
    without their ``scheme://``: listed through pyarrow's filesystem of the URL's scheme (credentials as that
    filesystem finds them, e.g. AWS's variables for S3)."""
    import pyarrow.fs

    filesystem, path = _filesystem(url)
    scheme, rest = url.split("://", 1)
    rest = rest.rstrip("/")
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.Directory:
        selector = pyarrow.fs.FileSelector(path, recursive=True)
        found = sorted(entry.path for entry in filesystem.get_file_info(selector)
                       if entry.type == pyarrow.fs.FileType.File and _is_image(entry.path))
        paths = [f"{rest}/{posixpath.relpath(entry, path)}" for entry in found]
        return rest, [(f"{scheme}://{p}", f"{scheme}://{p}", p) for p in paths]
    if info.type == pyarrow.fs.FileType.File:
        return posixpath.dirname(rest), [(url, url, rest)]
    raise SystemExit(f"error: {url} does not exist")


def _filesystem(url: str):
    """(pyarrow filesystem, the URL's path in it); one filesystem per scheme and host (an S3 filesystem resolves
    its bucket's region when made: once, not per file)."""
    parts = urlsplit(url)
    filesystem, root = _filesystem_of(parts.scheme, parts.netloc)
    root = root.rstrip("/")
    return filesystem, f"{root}{parts.path}" if root else parts.path


@functools.lru_cache(maxsize=16)
def _filesystem_of(scheme: str, netloc: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{netloc}/")
