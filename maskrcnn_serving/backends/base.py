"""The interface every backend implements, and the registry of backends by name.

A backend is a loaded network split in two steps, so that the caller can time them and run them on different
threads (:mod:`maskrcnn_serving.pipeline`):

* :meth:`Backend.preprocess` (any thread, thread-safe): resize one decoded image for the network;
* :meth:`Backend.forward` (one thread at a time): run the network on a batch of prepared images that share a
  :attr:`PreparedImage.batch_key` and one :class:`PredictOptions`, at most :attr:`Backend.max_batch_size` of them.

Tools that inspect the network rather than run it (the GPU kernel audit, :mod:`maskrcnn_serving.gpu_audit`) get the
TensorFlow graph of a forward call from :meth:`Backend.inference_graph`.

Which images share a forward call is decided in exactly one place, :class:`maskrcnn_serving.scheduler.Scheduler`.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maskrcnn_serving.model_dir import ModelBundle, load_model_dir
from maskrcnn_serving.modeling.constants import embedding_dim
from maskrcnn_serving.modeling.preprocess import boxes_to_original, resize_image
from maskrcnn_serving.settings import Settings
from maskrcnn_serving.structures import Detections

if TYPE_CHECKING:  # each backend imports TensorFlow itself; this module does not
    import tensorflow as tf


@dataclass(frozen=True)
class PredictOptions:
    """Per-call overrides of the model's test config; None keeps the config value.

    score_threshold: keep detections with score strictly above it (``TEST.RESULT_SCORE_THRESH``, 0.05 by
        default). Applied inside the graph before per-class NMS, so 0 can be used to force a fixed detection count.
    max_detections: at most this many detections per image (``TEST.RESULTS_PER_IM``, 100 by default).
    embeddings: also compute the instances' and the image's search vectors (modeling/embeddings.py).
    """

    score_threshold: float | None = None
    max_detections: int | None = None
    embeddings: bool = False


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image ready for :meth:`Backend.forward`.

    resized: (h, w, 3) uint8 BGR network input (the test-time resize of the original).
    scale: the isotropic factor from original to resized pixels (boxes are divided by it to map back).
    original_hw: (H, W) of the decoded original image.
    batch_key: images with equal keys may share a forward call (e.g. the optimized backend's size bucket).
    """

    resized: np.ndarray
    scale: float
    original_hw: tuple[int, int]
    batch_key: Hashable = None


@dataclass(frozen=True)
class InferenceGraph:
    """The TensorFlow graph of one forward call, for tools that inspect the network instead of running it.

    graph: a TF1 session graph, or the graph of a traced ``tf.function`` (its nested and XLA-compiled functions are
        in the graph's function library).
    outputs: every tensor (or op) a forward call may fetch, search vectors included: the ops a call runs are
        their transitive inputs.
    precision: the dtype name the network computes in (``float32``, ``float16``, ...).
    details: what else shaped the graph, for reports (e.g. the batch size it was traced for).
    """

    graph: tf.Graph
    outputs: Sequence[tf.Tensor | tf.Operation]
    precision: str
    details: Mapping[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """A loaded model that turns BGR images into :class:`Detections`.

    Lifecycle: :func:`load_backend` (or ``from_bundle``) builds the network and loads every weight, or raises
    :class:`~maskrcnn_serving.errors.ModelLoadError`; then ``preprocess`` / ``forward``; ``close`` frees it.
    """

    name: str = ""
    #: Images per forward call, at most (1: the backend runs one image at a time).
    max_batch_size: int = 1
    #: The ``Settings.precision`` values the backend computes in (a backend with just one ignores the setting).
    precisions: tuple[str, ...] = ("float32",)

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    @classmethod
    @abstractmethod
    def from_bundle(cls, bundle: ModelBundle, settings: Settings, for_gpu: bool | None = None) -> Backend:
        """Build the backend from an already validated model bundle. ``for_gpu``: configure the network as for a
        machine with (True) or without (False) a GPU, whatever this machine has; None: as for this machine."""

    @classmethod
    def batch_size_for(cls, settings: Settings) -> int:
        """:attr:`max_batch_size` of this backend built with ``settings``, known without building it (a batch job
        sizes the batches it hands each model copy by it)."""
        return cls.max_batch_size

    @classmethod  # noqa: B027 - most backends have no setting to refuse
    def check_settings(cls, settings: Settings) -> None:
        """Raise ValueError for settings this backend cannot run with, without building anything (default: none).
        ``from_bundle`` refuses them too; ``serve`` calls this before it starts any worker."""

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @property
    def has_masks(self) -> bool:
        return bool(self.bundle.architecture.is_mask_rcnn)

    @property
    def embedding_dim(self) -> int:
        """Length of an instance's search vector (``embeddings=True``): FPN channels + classes + 1."""
        return self.embedding_dim_of(self.bundle)

    @staticmethod
    def embedding_dim_of(bundle: ModelBundle) -> int:
        """:attr:`embedding_dim` of ``bundle``'s model, without building the network (``serve``'s model check)."""
        architecture = bundle.architecture
        return embedding_dim(architecture.fpn_channels, architecture.num_categories)

    @property
    def description(self) -> dict:
        """What the backend computes with, for logs and metadata (e.g. the optimized backend's precision)."""
        return {"backend": self.name, "precision": "float32"}

    def preprocess(self, image: np.ndarray) -> PreparedImage:
        """Resize a decoded (H, W, 3) BGR uint8 image for the network (thread-safe)."""
        inference = self.bundle.inference
        resized, scale = resize_image(image, inference.short_edge_size, inference.max_size)
        return PreparedImage(resized, scale, (int(image.shape[0]), int(image.shape[1])), self.batch_key(resized))

    def batch_key(self, resized: np.ndarray) -> Hashable:
        """Images whose keys are equal may share a forward call (default: any images)."""
        return None

    @abstractmethod
    def forward(self, batch: Sequence[PreparedImage], options: PredictOptions) -> list[Detections]:
        """Detect objects in each image of ``batch`` (at most ``max_batch_size`` images with one ``batch_key``).

        Returns one :class:`Detections` per image, in order, in original-image coordinates. Called from one
        thread at a time.
        """

    def warm_up(self) -> None:  # noqa: B027 - most backends have nothing to prepare
        """Prepare, before the first request, whatever a request would otherwise pay for the first time it meets a
        batch size or an image size (traces, compilations). The server runs it before ``/ping`` says ready."""

    def predict(self, images: Sequence[np.ndarray], options: PredictOptions | None = None) -> list[Detections]:
        """Detect objects in decoded BGR images, one forward call per image: the simple in-process use (tests,
        notebooks). Servers and batch jobs go through :class:`maskrcnn_serving.pipeline.Pipeline` instead."""
        options = options or PredictOptions()
        return [self.forward([self.preprocess(image)], options)[0] for image in images]

    @abstractmethod
    def inference_graph(self, batch_size: int = 1) -> InferenceGraph:
        """The graph one forward call of ``batch_size`` images runs, with every output a request may ask for
        (traced on first use where the backend traces). ValueError if the backend cannot take ``batch_size``."""

    def close(self) -> None:  # noqa: B027 - most backends have nothing to free
        """Free the network (sessions, compiled functions). The backend cannot be used afterwards."""

    def detections(
        self,
        image: PreparedImage,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        mask_probs: np.ndarray | None,
        embeddings: np.ndarray | None = None,
        image_embedding: np.ndarray | None = None,
    ) -> Detections:
        """The :class:`Detections` of one image from network outputs in resized-image pixels."""
        return Detections(
            boxes=boxes_to_original(boxes, image.scale, image.original_hw),
            scores=scores,
            labels=labels.astype(np.int64),
            class_names=self.class_names,
            image_hw=image.original_hw,
            mask_probs=mask_probs,
            accurate_paste=self.bundle.inference.accurate_paste,
            embeddings=embeddings,
            image_embedding=image_embedding,
        )


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


def load_backend(
    name: str,
    model_dir: str | Path | None = None,
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    for_gpu: bool | None = None,
) -> Backend:
    """Load ``model_dir`` (None: the settings' ``model_dir``, ``SM_MODEL_DIR`` or ``/opt/ml/model``) with the backend
    registered as ``name``.

    ``environ``: where the model config's overrides (``CONFIG__*``, ``RESNET_ARCH``) and, when ``settings`` is None,
    the settings are read (default: the process environment).
    ``settings``: how the backend computes (precision, batch size, ...); ValueError if the backend cannot run with
    them. ``for_gpu``: configure as for a machine with or without a GPU (see :meth:`Backend.from_bundle`).
    """
    backend_class = get_backend_class(name)
    environ = os.environ if environ is None else environ
    settings = settings if settings is not None else Settings.from_env(environ)
    return backend_class.from_bundle(load_model_dir(model_dir or settings.model_dir, environ), settings, for_gpu)
