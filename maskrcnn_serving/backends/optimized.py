"""The ``optimized`` backend: TF2-native Mask R-CNN (tf.function, NHWC), batched, with precision switches.

Same checkpoints, same answers as the ``tensorpack`` backend (the network in
:mod:`maskrcnn_serving.modeling.tf2_network` shares tensorpack's conventions through ``modeling/``), less time per
image: FrozenBN folded into the convolutions, several images per graph call, no tensorpack layers, and optional
bfloat16 / float16 compute and XLA. It uses no GPU-only op, so it runs on CPU and GPU.

Size buckets: a graph call takes B images zero-padded to one size. Each resized image's bucket is its size rounded
up to a multiple of ``bucket_step`` (default 32, the multiple the network pads to anyway, so no work is wasted; it
must be a multiple of that, :func:`check_bucket_step`); only images of the same bucket share a call
(:meth:`OptimizedBackend.batch_key`). The traced graph has a dynamic batch size, height and width, so neither a new
size nor a new batch size retraces it: one trace (two with the search vectors). Because the network masks the
padding where buckets are coarser than 32 (:func:`masks_bucket_padding`, see tf2_network), the detections of an
image do not depend on its bucket or its batch.

Settings (:class:`maskrcnn_serving.settings.Settings`, from the environment or flags): ``MASKRCNN_PRECISION``
(float32 | bfloat16 | float16 | mixed: float16 on GPU, bfloat16 on CPUs where it was measured faster),
``MASKRCNN_WINOGRAD`` (auto | 0 | 1; auto: on for float32 without a GPU, whose cuDNN picks its own algorithms),
``MASKRCNN_XLA`` (0/1), ``MASKRCNN_MAX_BATCH_SIZE`` (default 8), ``MASKRCNN_BUCKET_STEP`` (default 32).

With Winograd on, its convolutions are XLA programs compiled per input size (modeling/winograd.py). So that a new
image size never waits for a compilation, they run at a few fixed canvases (:func:`winograd_canvases`: five image
sizes, square, 4:3 and the longest per orientation): a batch's Winograd layers run zero-padded to the smallest
canvas that holds its bucket, image by image, and :meth:`OptimizedBackend.warm_up`, which the server runs before
``/ping`` says ready, compiles them all. With ``MASKRCNN_XLA`` the dense part is compiled per shape: use a coarser
``bucket_step`` (e.g. 128) there to bound the number of compilations.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from maskrcnn_serving.backends.base import Backend, InferenceGraph, PredictOptions, PreparedImage
from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling import winograd
from maskrcnn_serving.modeling.constants import SIZE_MULTIPLE
from maskrcnn_serving.modeling.tf2_network import MaskRCNN
from maskrcnn_serving.settings import PRECISIONS, Settings
from maskrcnn_serving.structures import Detections

log = logging.getLogger(__name__)

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def cpu_prefers_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether bfloat16 is measured faster than float32 on this CPU: Intel CPUs with AMX tiles (amx_bf16), and AMD
    CPUs with AVX512-BF16. Measured (docs/optimized-backend.md): an Intel Xeon with AMX ran the R50 fixture 3-4x
    faster in bfloat16 than in float32 (oneDNN's AMX kernels); an AMD EPYC with AVX512-BF16 1.5x; an Intel Xeon with
    AVX512-BF16 but no AMX visible at 0.46x float32's speed. ``cpuinfo``: the text of /proc/cpuinfo (read when
    None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(65536)
        except OSError:
            return False
    lines = cpuinfo.splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "").split()
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    return "amx_bf16" in flags or (vendor == "AuthenticAMD" and "avx512_bf16" in flags)


def winograd_canvases(short_edge: int, max_size: float, step: int) -> tuple[tuple[int, int], ...]:
    """The image sizes (H, W) at which the Winograd convolutions run, smallest first: every image of the test
    resize (short edge ``short_edge``, long edge at most ``max_size``), padded to its bucket of ``step``, fits in
    one. Per orientation the short side is the bucketed short edge and the long side one of: square, 4:3 (the
    commonest photo) and the longest, so a 4:3 photo runs unpadded and any other pads its Winograd layers by at most
    the gap to the next canvas. Five sizes in all (three programs' worth of each Winograd layer per orientation)."""
    def up(side: float) -> int:
        return -(-int(side) // step) * step

    short = up(min(short_edge, max_size))
    longs = sorted({min(up(side), up(max_size)) for side in (short_edge, round(short_edge * 4 / 3), max_size)})
    landscape = [(short, long) for long in longs if long >= short]
    return tuple(sorted(set(landscape + [(w, h) for h, w in landscape]), key=lambda c: (c[0] * c[1], c)))


def _has_gpu(for_gpu: bool | None) -> bool:
    return bool(tf.config.list_physical_devices("GPU")) if for_gpu is None else for_gpu


def resolve_precision(precision: str, for_gpu: bool | None = None) -> str:
    """The concrete compute dtype name for a precision setting (``mixed`` depends on the device; ``for_gpu``
    overrides the detection, e.g. to audit the GPU configuration on a machine without one)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "mixed":
        return precision
    if _has_gpu(for_gpu):
        return "float16"
    if cpu_prefers_bfloat16():
        return "bfloat16"
    log.info("precision=mixed: float32 on this CPU (bfloat16 was measured faster only with AMX or on AMD CPUs with "
             "AVX512-BF16)")
    return "float32"


def resolve_winograd(mode: str, dtype_name: str, for_gpu: bool | None = None) -> bool:
    """Whether the network uses Winograd convolutions: ``auto`` means float32 on a machine without a GPU."""
    if mode == "auto":
        return dtype_name == "float32" and not _has_gpu(for_gpu)
    if mode == "on" and dtype_name != "float32":
        raise ValueError(f"winograd=on needs precision float32, not {dtype_name}")
    return mode == "on"


def check_bucket_step(step: int) -> None:
    """ValueError unless ``step`` is a positive multiple of the network's size multiple (32): every side of a
    batch must be padded to a size the network takes as it is."""
    if step < SIZE_MULTIPLE or step % SIZE_MULTIPLE:
        raise ValueError(f"bucket_step must be a positive multiple of {SIZE_MULTIPLE}, got {step}")


def masks_bucket_padding(step: int) -> bool:
    """Whether the network must mask the padding of a batch in buckets of ``step``: buckets coarser than the
    network's multiple of 32 pad images beyond what tensorpack pads; buckets of 32 pad exactly as it does."""
    return step > SIZE_MULTIPLE


class OptimizedBackend(Backend):
    """TF2-native batched Mask R-CNN."""

    name = "optimized"
    precisions = PRECISIONS

    def __init__(self, bundle: ModelBundle, network: MaskRCNN, settings: Settings, dtype_name: str) -> None:
        super().__init__(bundle)
        self.network = network
        self.settings = settings
        self.dtype_name = dtype_name
        self.max_batch_size = self.batch_size_for(settings)
        inference = bundle.inference
        self.canvases = (
            winograd_canvases(inference.short_edge_size, inference.max_size, settings.bucket_step)
            if network.winograd else ()
        )
        self.traces = 0  # graphs traced so far: one with and one without the search vectors, at most
        self._functions: dict[bool, tf.types.experimental.ConcreteFunction] = {}
        self._lock = threading.Lock()

    @classmethod
    def batch_size_for(cls, settings: Settings) -> int:
        return settings.max_batch_size

    @classmethod
    def check_settings(cls, settings: Settings) -> None:
        check_bucket_step(settings.bucket_step)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, settings: Settings, for_gpu: bool | None = None) -> OptimizedBackend:
        """``for_gpu``: configure as for a machine with (True) or without (False) a GPU; None detects it."""
        cls.check_settings(settings)
        dtype_name = resolve_precision(settings.precision, for_gpu)
        use_winograd = resolve_winograd(settings.winograd, dtype_name, for_gpu)
        if dtype_name == "float16" and not _has_gpu(for_gpu):
            # Measured: TF 2.21's fused float16 MatMul+BiasAdd CPU kernel takes seconds where float32 takes ms.
            log.warning("precision float16 without a GPU is very slow (TensorFlow's fused float16 MatMul on CPU); "
                        "use bfloat16 or mixed on CPUs")
        log.info("optimized backend: compute %s, Winograd %s, XLA %s, batch %d, buckets of %d", dtype_name,
                 use_winograd, settings.xla, settings.max_batch_size, settings.bucket_step)
        network = MaskRCNN(
            bundle, _DTYPES[dtype_name], jit_compile=settings.xla, winograd=use_winograd,
            masked_padding=masks_bucket_padding(settings.bucket_step),
        )
        return cls(bundle, network, settings, dtype_name)

    @property
    def description(self) -> dict:
        return {"backend": self.name, "precision": self.dtype_name, "winograd": self.network.winograd,
                "winograd_canvases": [f"{h}x{w}" for h, w in self.canvases], "xla": self.settings.xla,
                "max_batch_size": self.max_batch_size}

    def detect_function(self, with_embeddings: bool = False) -> tf.types.experimental.ConcreteFunction:
        """The traced graph for a batch of any size of images of any (H, W) (traced on first use, then cached),
        with or without the search vectors. Arguments: images, image_hw, score_threshold, max_detections and
        winograd_canvas (:meth:`winograd_canvas`), as :meth:`MaskRCNN.detect` takes them."""
        key = with_embeddings
        with self._lock:
            if key not in self._functions:
                signature = [
                    tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
                    tf.TensorSpec([None, 2], tf.int32, name="image_hw"),
                    tf.TensorSpec([], tf.float32, name="score_threshold"),
                    tf.TensorSpec([], tf.int32, name="max_detections"),
                    tf.TensorSpec([2], tf.int32, name="winograd_canvas"),
                ]

                def detect(*args, **kwargs):
                    self.traces += 1  # Python runs only while tracing
                    return self.network.detect(*args, **kwargs)

                function = tf.function(detect, autograph=False)
                self._functions[key] = function.get_concrete_function(*signature, with_embeddings=with_embeddings)
            return self._functions[key]

    def inference_graph(self, batch_size: int = 1) -> InferenceGraph:
        """The traced function of :meth:`detect_function` with the search vectors (one graph for every batch size,
        through its nested and XLA-compiled functions: every op a request may run)."""
        graph = self.detect_function(with_embeddings=True).graph
        return InferenceGraph(graph, [*graph.outputs, *graph.control_outputs], self.dtype_name,
                              {"batch_size": batch_size, "winograd": self.network.winograd})

    def winograd_canvas(self, bucket_hw: tuple[int, int]) -> tuple[int, int]:
        """The canvas (see :func:`winograd_canvases`) a batch of padded size ``bucket_hw`` runs its Winograd
        convolutions at: the smallest that holds it; (0, 0) (direct convolutions) when none does or without
        Winograd."""
        fitting = [c for c in self.canvases if c[0] >= bucket_hw[0] and c[1] >= bucket_hw[1]]
        return min(fitting, key=lambda c: c[0] * c[1]) if fitting else (0, 0)

    def warm_up(self) -> None:
        """Trace the graph, with and without the search vectors, on a tiny image (direct convolutions; the mask
        head's Winograd stack compiles there), then compile the Winograd programs of every canvas: after this, no
        request traces or compiles, whatever its batch size and image size. The canvases' programs compile on
        zero maps of their sizes, not by running the network on an image of each canvas: 1-2 s less per canvas.
        With ``MASKRCNN_XLA`` the dense part is one program per input size, so there it runs at each canvas."""
        # Score threshold 0: every stage runs on as many detections as a request can have.
        options = (tf.constant(0.0), tf.constant(self.bundle.inference.results_per_image))
        side = SIZE_MULTIPLE
        for with_embeddings in (False, True):
            self.detect_function(with_embeddings)(tf.zeros([1, side, side, 3], tf.uint8), tf.constant([[side, side]]),
                                                  *options, tf.zeros([2], tf.int32))
        for height, width in self.canvases:
            if self.settings.xla:
                self.detect_function()(tf.zeros([1, height, width, 3], tf.uint8), tf.constant([[height, width]]),
                                       *options, tf.constant([height, width]))
                continue
            for stride, channels, out_channels in sorted(self.network.winograd_maps):  # filled by the traces above
                winograd.compile_program(height // stride, width // stride, channels, out_channels)

    def batch_key(self, resized: np.ndarray) -> tuple[int, int]:
        """The padded (H, W) a resized image runs at: each side rounded up to a multiple of ``bucket_step``."""
        step = self.settings.bucket_step
        return tuple(-(-int(side) // step) * step for side in resized.shape[:2])

    def forward(self, batch: Sequence[PreparedImage], options: PredictOptions) -> list[Detections]:
        inference = self.bundle.inference
        threshold = inference.score_threshold if options.score_threshold is None else options.score_threshold
        limit = inference.results_per_image if options.max_detections is None else options.max_detections
        height, width = batch[0].batch_key
        images = np.zeros((len(batch), height, width, 3), np.uint8)
        image_hw = np.zeros((len(batch), 2), np.int32)
        for row, image in enumerate(batch):
            if image.batch_key != (height, width):
                raise ValueError("a forward call takes images of one size bucket")
            images[row, : image.resized.shape[0], : image.resized.shape[1]] = image.resized
            image_hw[row] = image.resized.shape[:2]
        outputs = self.detect_function(options.embeddings)(
            tf.constant(images), tf.constant(image_hw), tf.constant(threshold, tf.float32),
            tf.constant(limit, tf.int32), tf.constant(self.winograd_canvas((height, width)), tf.int32),
        )
        outputs = {k: v.numpy() for k, v in outputs.items()}
        ends = np.cumsum(outputs["counts"])
        results = []
        for row, image in enumerate(batch):
            rows = slice(ends[row] - outputs["counts"][row], ends[row])
            per_detection = {k: outputs[k][rows] if k in outputs else None for k in ("masks", "embeddings")}
            image_embedding = outputs["image_embeddings"][row] if "image_embeddings" in outputs else None
            results.append(self.detections(image, outputs["boxes"][rows], outputs["scores"][rows],
                                           outputs["labels"][rows], per_detection["masks"],
                                           per_detection["embeddings"], image_embedding))
        return results
