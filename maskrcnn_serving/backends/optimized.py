"""The ``optimized`` backend: TF2-native Mask R-CNN (tf.function, NHWC), batched, with precision switches.

Same checkpoints, same answers as the ``tensorpack`` backend (the network in
:mod:`maskrcnn_serving.modeling.tf2_network` shares tensorpack's conventions through ``modeling/``), less time per
image: FrozenBN folded into the convolutions, several images per graph call, no tensorpack layers, and optional
bfloat16 / float16 compute and XLA. It uses no GPU-only op, so it runs on CPU and GPU.

Size buckets: a graph call takes B images zero-padded to one size. Each resized image's bucket is its size rounded
up to a multiple of ``bucket_step`` (default 32, the multiple the network pads to anyway, so no work is wasted);
only images of the same bucket share a call. The traced graph has dynamic height and width, so a new size never
retraces: one trace per batch size (1..max_batch_size). With XLA on, each (batch, bucket) shape compiles once;
use a coarser ``bucket_step`` (e.g. 128) there to bound the number of compilations. Because the network masks the
padding (see tf2_network), the detections of an image do not depend on its bucket or its batch.

Settings come from keyword arguments of ``from_bundle`` / ``load`` or, when absent, the environment:
``MASKRCNN_PRECISION`` (float32 | bfloat16 | float16 | mixed: float16 on GPU, bfloat16 on CPUs with AVX512-BF16 or
AMX), ``MASKRCNN_WINOGRAD`` (auto | 0 | 1; auto: on for float32 without a GPU, whose cuDNN picks its own
algorithms), ``MASKRCNN_XLA`` (0/1), ``MASKRCNN_MAX_BATCH_SIZE`` (default 8), ``MASKRCNN_BUCKET_STEP`` (default 32).

With Winograd on, each new (batch size, bucket) shape also compiles a few small XLA programs on first use (about
0.3-0.8 s each, five shapes for ResNet-50-FPN), and so does each new padded detection count of the mask head
(multiples of 8); the server's warm-up inference (a 4:3 landscape image at the test size) compiles the most common
shape before ``/ping`` says ready.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from maskrcnn_serving.backends.base import Backend, PredictOptions
from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling.preprocess import boxes_to_original, resize_image
from maskrcnn_serving.modeling.tf2_network import SIZE_MULTIPLE, MaskRCNN
from maskrcnn_serving.structures import Detections
from maskrcnn_serving.timing import stage

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "float16", "mixed")
WINOGRAD_MODES = ("auto", "on", "off")
_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}


def cpu_supports_bfloat16() -> bool:
    """True on x86 CPUs with native bfloat16 dot products (AVX512-BF16 or AMX-BF16), where oneDNN runs bf16 fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    if cpu_supports_bfloat16():
        return "bfloat16"
    log.warning("precision=mixed: no GPU and no bfloat16 support in this CPU; computing in float32.")
    return "float32"


def _env_flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _winograd_mode(value: str | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    text = value.strip().lower()
    if text == "auto":
        return text
    if text in ("1", "true", "yes", "on"):
        return "on"
    if text in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"winograd must be auto, on or off, not {value!r}")


def resolve_winograd(mode: str, dtype_name: str, for_gpu: bool | None = None) -> bool:
    """Whether the network uses Winograd convolutions: ``auto`` means float32 on a machine without a GPU."""
    if mode == "auto":
        return dtype_name == "float32" and not _has_gpu(for_gpu)
    if mode == "on" and dtype_name != "float32":
        raise ValueError(f"winograd=on needs precision float32, not {dtype_name}")
    return mode == "on"


@dataclass(frozen=True)
class OptimizedSettings:
    """How the optimized backend computes; see the module docstring."""

    precision: str = "float32"
    winograd: str = "auto"
    xla: bool = False
    max_batch_size: int = 8
    bucket_step: int = SIZE_MULTIPLE

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        object.__setattr__(self, "winograd", _winograd_mode(self.winograd))
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.bucket_step < SIZE_MULTIPLE or self.bucket_step % SIZE_MULTIPLE:
            raise ValueError(f"bucket_step must be a positive multiple of {SIZE_MULTIPLE}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides) -> OptimizedSettings:
        """Settings from ``MASKRCNN_*`` variables; keyword arguments that are not None win."""
        environ = os.environ if environ is None else environ
        values = {
            "precision": environ.get("MASKRCNN_PRECISION", cls.precision),
            "winograd": environ.get("MASKRCNN_WINOGRAD", cls.winograd),
            "xla": _env_flag(environ.get("MASKRCNN_XLA", "0")),
            "max_batch_size": int(environ.get("MASKRCNN_MAX_BATCH_SIZE", cls.max_batch_size)),
            "bucket_step": int(environ.get("MASKRCNN_BUCKET_STEP", cls.bucket_step)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class OptimizedBackend(Backend):
    """TF2-native batched Mask R-CNN; ``predict`` is thread-safe."""

    name = "optimized"

    def __init__(self, bundle: ModelBundle, network: MaskRCNN, settings: OptimizedSettings) -> None:
        super().__init__(bundle)
        self.network = network
        self.settings = settings
        self._accurate_paste = bool(bundle.config["MRCNN.ACCURATE_PASTE"])
        self._functions: dict[int, tf.types.experimental.ConcreteFunction] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(
        cls,
        bundle: ModelBundle,
        precision: str | None = None,
        winograd: str | bool | None = None,
        xla: bool | None = None,
        max_batch_size: int | None = None,
        bucket_step: int | None = None,
        environ: Mapping[str, str] | None = None,
        for_gpu: bool | None = None,
    ) -> OptimizedBackend:
        """``for_gpu``: configure as for a machine with (True) or without (False) a GPU; None detects it."""
        settings = OptimizedSettings.from_environ(
            environ, precision=precision, winograd=winograd, xla=xla, max_batch_size=max_batch_size,
            bucket_step=bucket_step,
        )
        dtype_name = resolve_precision(settings.precision, for_gpu)
        use_winograd = resolve_winograd(settings.winograd, dtype_name, for_gpu)
        if dtype_name == "float16" and not _has_gpu(for_gpu):
            # Measured: TF 2.21's fused float16 MatMul+BiasAdd CPU kernel takes seconds where float32 takes ms.
            log.warning("precision float16 without a GPU is very slow (TensorFlow's fused float16 MatMul on CPU); "
                        "use bfloat16 or mixed on CPUs")
        log.info("optimized backend: compute %s, Winograd %s, XLA %s, %s", dtype_name, use_winograd, settings.xla,
                 settings)
        network = MaskRCNN(
            bundle, _DTYPES[dtype_name], jit_compile=settings.xla, winograd=use_winograd,
            # Buckets of 32 pad every image exactly as tensorpack does: nothing to mask.
            masked_padding=settings.bucket_step > SIZE_MULTIPLE,
        )
        return cls(bundle, network, settings)

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size

    def detect_function(self, batch_size: int) -> tf.types.experimental.ConcreteFunction:
        """The traced graph for ``batch_size`` images of any (H, W) (traced on first use, then cached)."""
        with self._lock:
            if batch_size not in self._functions:
                signature = [
                    tf.TensorSpec([batch_size, None, None, 3], tf.uint8, name="images"),
                    tf.TensorSpec([batch_size, 2], tf.int32, name="image_hw"),
                    tf.TensorSpec([], tf.float32, name="score_threshold"),
                    tf.TensorSpec([], tf.int32, name="max_detections"),
                ]
                self._functions[batch_size] = tf.function(self.network.detect).get_concrete_function(*signature)
            return self._functions[batch_size]

    def bucket(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        """The padded (H, W) a resized image runs at: each side rounded up to a multiple of ``bucket_step``."""
        step = self.settings.bucket_step
        return tuple(-(-side // step) * step for side in resized_hw)

    def predict(self, images: Sequence[np.ndarray], options: PredictOptions | None = None) -> list[Detections]:
        options = options or PredictOptions()
        cfg = self.bundle.config
        threshold = cfg["TEST.RESULT_SCORE_THRESH"] if options.score_threshold is None else options.score_threshold
        limit = cfg["TEST.RESULTS_PER_IM"] if options.max_detections is None else options.max_detections
        with stage("preprocess"):  # reported to the server's metrics and the benchmarks (see Backend.predict)
            prepared = [resize_image(image, cfg.short_edge_size, cfg.max_size) for image in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, (resized, _) in enumerate(prepared):
            groups[self.bucket(resized.shape[:2])].append(index)
        results: list[Detections | None] = [None] * len(images)
        for (height, width), indices in groups.items():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                batch = np.zeros((len(chunk), height, width, 3), np.uint8)
                image_hw = np.zeros((len(chunk), 2), np.int32)
                for row, index in enumerate(chunk):
                    resized = prepared[index][0]
                    batch[row, : resized.shape[0], : resized.shape[1]] = resized
                    image_hw[row] = resized.shape[:2]
                outputs = self.detect_function(len(chunk))(
                    tf.constant(batch), tf.constant(image_hw), tf.constant(threshold, tf.float32),
                    tf.constant(limit, tf.int32),
                )
                outputs = {k: v.numpy() for k, v in outputs.items()}
                ends = np.cumsum(outputs["counts"])
                for row, index in enumerate(chunk):
                    rows = slice(ends[row] - outputs["counts"][row], ends[row])
                    original_hw = (int(images[index].shape[0]), int(images[index].shape[1]))
                    results[index] = Detections(
                        boxes=boxes_to_original(outputs["boxes"][rows], prepared[index][1], original_hw),
                        scores=outputs["scores"][rows],
                        labels=outputs["labels"][rows].astype(np.int64),
                        class_names=self.class_names,
                        image_hw=original_hw,
                        mask_probs=outputs["masks"][rows] if "masks" in outputs else None,
                        accurate_paste=self._accurate_paste,
                    )
        return results
