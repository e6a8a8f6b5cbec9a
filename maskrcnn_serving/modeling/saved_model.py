"""A TensorFlow SavedModel of the whole inference path, for TensorFlow Serving (``maskrcnn-serving export``).

Signatures (every input is a batch; images in one call may differ in size when they arrive encoded):

* ``serving_default``: ``images`` string [N], encoded JPEG / PNG / BMP / GIF (first frame) bytes.
* ``detect_images``: ``images`` uint8 [N, H, W, 3] **RGB** (what ``tf.io.decode_image`` gives) of one size.

Both resize each image in the graph exactly as :func:`~maskrcnn_serving.modeling.preprocess.resized_shape` says
(bilinear, half-pixel centres, rounded to uint8: cv2's INTER_LINEAR up to +-1 grey level of fixed-point rounding),
run the network of :mod:`~maskrcnn_serving.modeling.tf2_network` (float32) one image at a time, and return, padded
to K = ``TEST.RESULTS_PER_IM`` rows per image:

* ``num_detections`` int32 [N]: valid rows per image; rows past it are zeros;
* ``boxes`` float32 [N, K, 4]: (x1, y1, x2, y2) in original-image pixels, clipped like tensorpack;
* ``scores`` float32 [N, K], descending; ``labels`` int32 [N, K] in 1..num_classes (0 in padding rows);
* ``masks`` float32 [N, K, 28, 28]: mask probabilities in each box's frame (paste them with the accurate paste of
  modeling/paste.py, or threshold a bilinear resize to the box, tensorpack's "fast" paste). Absent for models
  without a mask head.

The score threshold and K are the model config's (``TEST.RESULT_SCORE_THRESH``, ``TEST.RESULTS_PER_IM``) at
export time; set them with ``CONFIG__TEST__...`` environment variables when exporting.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling.constants import MASK_SIZE, SIZE_MULTIPLE
from maskrcnn_serving.modeling.tf2_network import MaskRCNN


def resized_shape_tf(image_hw: tf.Tensor, short_edge: float, max_size: float) -> tf.Tensor:
    """[2] int32 (new_h, new_w): the graph version of ``preprocess.resized_shape`` (float64, rounded half up, >= 1)."""
    hw = tf.cast(image_hw, tf.float64)
    height, width = hw[0], hw[1]
    scale = short_edge / tf.minimum(height, width)
    new_h = tf.where(height < width, tf.constant(short_edge, tf.float64), scale * height)
    new_w = tf.where(height < width, scale * width, tf.constant(short_edge, tf.float64))
    shrink = tf.minimum(tf.constant(1.0, tf.float64), max_size / tf.maximum(new_h, new_w))
    return tf.maximum(tf.cast(tf.floor(tf.stack([new_h * shrink, new_w * shrink]) + 0.5), tf.int32), 1)


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] uint8 RGB of encoded bytes. JPEGs use the accurate integer DCT, which gives the same pixels as
    cv2.imdecode (TensorFlow's default fast DCT differs by a few grey levels)."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False), [None, None, 3]),
    )


class ServingModule(tf.Module):
    """The exported object: the network's variables plus the two signatures."""

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(name="maskrcnn_serving")
        cfg = bundle.inference
        self.network = MaskRCNN(bundle, tf.float32, jit_compile=False)
        self.has_masks = self.network.has_masks
        self._short_edge = float(cfg.short_edge_size)
        self._max_size = float(cfg.max_size)
        self._score_threshold = cfg.score_threshold
        self._limit = cfg.results_per_image
        self.class_names = tf.constant(list(bundle.class_names))

    def _detect_one(self, rgb: tf.Tensor) -> dict[str, tf.Tensor]:
        """Detections of one [H, W, 3] uint8 RGB image, padded to K rows."""
        image_hw = tf.shape(rgb)[:2]
        new_hw = resized_shape_tf(image_hw, self._short_edge, self._max_size)
        bgr = tf.reverse(rgb, axis=[-1])
        resized = tf.image.resize(tf.cast(bgr, tf.float32), new_hw, method="bilinear")
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        padded_hw = (new_hw + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE * SIZE_MULTIPLE
        padded = tf.pad(resized, [[0, padded_hw[0] - new_hw[0]], [0, padded_hw[1] - new_hw[1]], [0, 0]])
        out = self.network.detect(
            padded[None], new_hw[None], tf.constant(self._score_threshold), tf.constant(self._limit)
        )
        # Back to the original image: one isotropic factor, then tensorpack's clip (see preprocess.boxes_to_original).
        original = tf.cast(image_hw, tf.float32)
        scale = tf.sqrt(tf.cast(new_hw[0], tf.float32) / original[0] * tf.cast(new_hw[1], tf.float32) / original[1])
        boxes = out["boxes"] / scale
        boxes = tf.concat(
            [tf.maximum(boxes[:, :2], 0.0), tf.minimum(boxes[:, 2:3], original[1]),
             tf.minimum(boxes[:, 3:4], original[0])], axis=1,
        )
        count = tf.shape(boxes)[0]
        pad = self._limit - count
        result = {
            "num_detections": count,
            "boxes": tf.pad(boxes, [[0, pad], [0, 0]]),
            "scores": tf.pad(out["scores"], [[0, pad]]),
            "labels": tf.pad(out["labels"], [[0, pad]]),
        }
        if self.has_masks:
            result["masks"] = tf.pad(out["masks"], [[0, pad], [0, 0], [0, 0]])
        return result

    def _output_signature(self) -> dict[str, tf.TensorSpec]:
        k = self._limit
        spec = {
            "num_detections": tf.TensorSpec([], tf.int32),
            "boxes": tf.TensorSpec([k, 4], tf.float32),
            "scores": tf.TensorSpec([k], tf.float32),
            "labels": tf.TensorSpec([k], tf.int32),
        }
        if self.has_masks:
            spec["masks"] = tf.TensorSpec([k, MASK_SIZE, MASK_SIZE], tf.float32)
        return spec

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def detect_encoded(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        def decode_and_detect(data):
            return self._detect_one(decode_rgb(data))

        return tf.map_fn(decode_and_detect, images, fn_output_signature=self._output_signature())

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")], autograph=False)
    def detect_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return tf.map_fn(self._detect_one, images, fn_output_signature=self._output_signature())


def export_saved_model(bundle: ModelBundle, output: Path) -> Path:
    """Write the SavedModel of ``bundle`` to ``output`` (created; must not hold a SavedModel already) and a
    ``maskrcnn_serving.json`` beside it with the class names and settings baked in."""
    output = Path(output)
    if (output / "saved_model.pb").exists():
        raise FileExistsError(f"{output} already holds a SavedModel; choose a new directory (e.g. a new version).")
    module = ServingModule(bundle)
    signatures = {
        "serving_default": module.detect_encoded.get_concrete_function(),
        "detect_images": module.detect_images.get_concrete_function(),
    }
    tf.saved_model.save(module, str(output), signatures=signatures)
    cfg = bundle.inference
    info = {
        "class_names": list(bundle.class_names),
        "score_threshold": cfg.score_threshold,
        "max_detections": cfg.results_per_image,
        "short_edge": cfg.short_edge_size,
        "max_size": cfg.max_size,
        "source_checkpoint": str(bundle.checkpoint_path),
    }
    (output / "assets.extra").mkdir(exist_ok=True)
    (output / "assets.extra" / "maskrcnn_serving.json").write_text(json.dumps(info, indent=2))
    return output
