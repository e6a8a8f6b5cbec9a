"""The interface the server, the CLI and the benchmarks call, and the registry of backends by name."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskrcnn_serving.model_dir import ModelBundle, load_model_dir
from maskrcnn_serving.structures import Detections


@dataclass(frozen=True)
class PredictOptions:
    """Per-call overrides of the model's test config; None keeps the config value.

    score_threshold: keep detections with score strictly above it (``TEST.RESULT_SCORE_THRESH``, 0.05 by
        default). Applied inside the graph before per-class NMS, so 0 can be used to force a fixed detection count.
    max_detections: at most this many detections per image (``TEST.RESULTS_PER_IM``, 100 by default).
    """

    score_threshold: float | None = None
    max_detections: int | None = None


class Backend(ABC):
    """A loaded model that turns BGR images into :class:`Detections`.

    Lifecycle: ``Backend.load(model_dir)`` (or ``from_bundle``) builds the network and loads every weight, or
    raises :class:`~maskrcnn_serving.errors.ModelLoadError`; then ``predict`` may be called from one thread at a
    time per instance unless the backend says otherwise.
    """

    name: str = ""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    @classmethod
    def load(cls, model_dir: str | Path | None = None, environ: Mapping[str, str] | None = None, **options):
        """Load the model directory (``SM_MODEL_DIR`` / ``/opt/ml/model`` when None) and build the backend."""
        return cls.from_bundle(load_model_dir(model_dir, environ), **options)

    @classmethod
    @abstractmethod
    def from_bundle(cls, bundle: ModelBundle, **options) -> Backend:
        """Build the backend from an already validated model bundle."""

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @abstractmethod
    def predict(self, images: Sequence[np.ndarray], options: PredictOptions | None = None) -> list[Detections]:
        """Detect objects in each image.

        images: uint8 arrays (H, W, 3) in BGR channel order (as cv2 decodes them), any size.
        Returns one :class:`Detections` per image, in the same order, in original-image coordinates.
        A backend reports the time of its input preparation (resize) as ``timing.stage("preprocess")``, so that
        the server's metrics and the benchmarks can tell it from the model itself.
        """


BACKENDS: dict[str, str] = {
    "tensorpack": "maskrcnn_serving.backends.tensorpack_backend:TensorpackBackend",
    "optimized": "maskrcnn_serving.backends.optimized:OptimizedBackend",
}


def get_backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (imported lazily: each pulls in TensorFlow)."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}.")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_backend(name: str, model_dir: str | Path | None = None, **options) -> Backend:
    """Load ``model_dir`` with the backend registered as ``name``."""
    return get_backend_class(name).load(model_dir, **options)
