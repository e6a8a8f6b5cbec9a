"""What the pipeline is asked, and what it gives back, whoever the caller is: the HTTP server (through its codec,
:mod:`maskrcnn_serving.wire`), ``predict``, ``eval``, ``index``, ``bench`` and the server's warm-up.

* :class:`RequestOptions`: the validated options of one image (turning client text into them is the codec's job);
* :class:`ImageRequest`: one image to run: its id, its encoded file, its options. The file is bytes, or anything
  with ``read_bytes()`` (a :class:`pathlib.Path`; the codec's base64 text), read in the pipeline's decode stage.
  Paths come from local callers only (the command line's files): the HTTP codec makes bytes or base64 text, so no
  client names a file;
* :class:`ImageResult`: what the pipeline made of one image.

Nothing here knows HTTP, JSON or base64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from maskrcnn_serving.structures import Detections

FORMATS = ("legacy", "coco", "polygon", "boxes")  # the annotation records: see postprocess.encode_annotations
MASK_FORMATS = ("legacy", "coco", "polygon")  # the formats with a segmentation (they need a mask head)


@dataclass(frozen=True)
class RequestOptions:
    """Validated per-image options.

    score_threshold: keep detections with score strictly above it (applied in the graph, before per-class NMS).
    mask_threshold: a mask pixel is set where the pasted probability is >= it.
    max_detections: at most this many detections (None: the model's ``TEST.RESULTS_PER_IM``).
    classes: keep only these contiguous class ids (None: all).
    format: one of :data:`FORMATS`.
    embeddings: add each instance's search vector (``embedding``) and the image's (``image_embedding``).
    neighbours: add each instance's this many nearest indexed instances (needs the pipeline's index).
    same_class: search the neighbours among instances of the instance's own class only.
    """

    score_threshold: float
    mask_threshold: float = 0.5
    max_detections: int | None = None
    classes: frozenset[int] | None = None
    format: str = "legacy"
    embeddings: bool = False
    neighbours: int | None = None
    same_class: bool = False


class FileSource(Protocol):
    """An encoded image file whose bytes are produced when the pipeline decodes it (so that reading, or decoding a
    transport encoding, is timed in the decode stage and fails there): a :class:`pathlib.Path` is one."""

    def read_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class ImageRequest:
    """One image to run: ``img_id`` is carried to its result (None: the image has no id); ``file`` is the encoded
    image file (JPEG, PNG, ...) as bytes or a :class:`FileSource`."""

    img_id: str | None
    file: bytes | FileSource
    options: RequestOptions

    def file_bytes(self) -> bytes:
        """The encoded image file's bytes (reading the source when it is not bytes already)."""
        return self.file if isinstance(self.file, bytes) else self.file.read_bytes()


@dataclass
class ImageResult:
    """One image through the pipeline: its id, its decoded pixels (H, W, 3) BGR, its detections (class filter and
    ``max_detections`` applied) and its annotation records in the requested format (search fields included)."""

    img_id: str | None
    image: np.ndarray
    detections: Detections
    annotations: list[dict]
