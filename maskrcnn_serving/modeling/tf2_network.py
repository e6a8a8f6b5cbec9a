"""TF2-native FPN Mask R-CNN: a ``tf.Module`` of plain TF ops, NHWC, several images per call.

The math is tensorpack's inference graph (docs/model-conventions.md), shared with the tensorpack backend through
:mod:`maskrcnn_serving.modeling.tf_ops` and :mod:`~maskrcnn_serving.modeling.anchors`. What differs is only how it
is computed:

* FrozenBN is folded into the preceding convolution at load (``W * gamma / sqrt(var + eps)``, bias
  ``beta - mean * gamma / sqrt(var + eps)``): the same function up to float rounding.
* A batch holds B resized images zero-padded (bottom/right) to one common size, a multiple of 32. tensorpack pads
  each image only to its own multiple of 32 and convolutions with SAME padding see zeros beyond that. To give every
  image exactly its batch-1 answer, each 3x3 stride-1 convolution's input is multiplied by the image's valid-region
  mask, the RPN reads anchors of the valid region only, and RoIAlign sees the valid region's edge replicated as
  tensorpack's SYMMETRIC padding does. So results do not depend on the batch or the padded size.
  When every image of a batch pads to the batch's own size (size buckets of 32, the default), that masking is
  the identity and is left out (``masked_padding=False``).
* Optional reduced precision (bfloat16 / float16) for the convolutions and hidden FC layers; the RPN, box and class
  outputs, mask logits, proposals, NMS and RoIAlign stay float32.
* Optional Winograd F(4x4, 3x3) for the float32 3x3 stride-1 convolutions with many channels on CPU
  (:mod:`.winograd`): the backbone's conv2 of groups 2-3, the FPN / RPN convolutions on P2-P4 and the mask head,
  where it needs 4x fewer multiplies; run at a fixed canvas size chosen by the caller, so that few programs compile.
* The batch size is dynamic: the per-image steps (proposals, per-class NMS) run in a while loop, so one traced graph
  serves every batch size.

Frames: input images are BGR uint8, already resized by :func:`~maskrcnn_serving.modeling.preprocess.resize_image`;
boxes are (x1, y1, x2, y2) float32 in resized-image pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling import embeddings, tf_ops, winograd
from maskrcnn_serving.modeling.anchors import fpn_anchors
from maskrcnn_serving.modeling.constants import (
    BN_EPSILON,
    BOX_RESOLUTION,
    MASK_RESOLUTION,
    MASK_SIZE,
    RESNET_GROUP_STRIDES,
    SIZE_MULTIPLE,
)

# Winograd pays off where channels are many (measured: 3x3 256->256 at 200x272 86 vs 165 ms, at 50x68 6 vs 11 ms, on
# 100 RoIs of 14x14 88 vs 105 ms; 512->512 at 25x34 15 vs 20 ms; but 64 channels at 200x272 33 vs 22 ms and 256 at
# 25x34 about even): at least 256 input channels, and for the FPN / RPN convolutions feature strides 4-16. 128
# channels (ResNet group 1, 100x136) lost on an Intel Xeon (25 vs 20 ms) and, with them, the R50 backbone + FPN + RPN
# at 800x1088 took the same time (median 1.14 s either way) while a new canvas compiled twice as many programs (7.1
# vs 3.5 s): docs/optimized-backend.md#same-answers.
WINOGRAD_STRIDES = (4, 8, 16)
WINOGRAD_MIN_CHANNELS = 256


def fold_frozen_bn(weights: Mapping[str, np.ndarray], scope: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (HWIO) and bias of ``scope``'s bias-free conv followed by its FrozenBN ``scope/bn``, in float64 maths."""
    kernel = weights[f"{scope}/W"].astype(np.float64)
    gamma = weights[f"{scope}/bn/gamma"].astype(np.float64)
    beta = weights[f"{scope}/bn/beta"].astype(np.float64)
    mean = weights[f"{scope}/bn/mean/EMA"].astype(np.float64)
    variance = weights[f"{scope}/bn/variance/EMA"].astype(np.float64)
    scale = gamma / np.sqrt(variance + BN_EPSILON)
    return (kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)


def valid_feature_hw(image_hw: tf.Tensor, stride: int) -> tf.Tensor:
    """(B, 2) int32 size of each image's feature map at ``stride``, as tensorpack computes it on the image padded to
    a multiple of 32 (P6: ``ceil(P5 / 2)``)."""
    padded = (image_hw + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE * SIZE_MULTIPLE
    return (padded + stride - 1) // stride


def _per_image(
    step: Callable[[tf.Tensor], Sequence[tf.Tensor]], batch: tf.Tensor, dtypes: Sequence[tf.DType]
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """Run ``step(b)`` for every image b < ``batch`` in a while loop, so that one graph serves every batch size.
    Each output of ``step`` (of ``dtypes``; int32 ones 1-D) has a first dimension that varies per image. Returns
    each output concatenated over the images, the (B,) int32 count of each image's rows and the (N,) int32 image
    of each row. int32 results are concatenated in the loop from shapes and host values, not passed through a
    TensorArray: on a GPU they stay in host memory, where TensorFlow keeps int32 tensors (no device copy)."""

    def accumulate(accumulator, b, output):
        return tf.concat([accumulator, output], 0) if output.dtype == tf.int32 else accumulator.write(b, output)

    def body(b, counts, images, *accumulators):
        outputs = step(b)
        count = tf.shape(outputs[0])[:1]
        return (b + 1, tf.concat([counts, count], 0), tf.concat([images, tf.fill(count, b)], 0),
                *[accumulate(acc, b, out) for acc, out in zip(accumulators, outputs, strict=True)])

    vector = tf.TensorShape([None])
    accumulators = [tf.zeros([0], tf.int32) if dtype == tf.int32 else tf.TensorArray(dtype, batch, infer_shape=False)
                    for dtype in dtypes]
    invariants = [vector if dtype == tf.int32 else tf.TensorShape(None) for dtype in dtypes]
    _, counts, images, *accumulators = tf.while_loop(
        lambda b, *_: b < batch, body, (0, tf.zeros([0], tf.int32), tf.zeros([0], tf.int32), *accumulators),
        shape_invariants=(tf.TensorShape([]), vector, vector, *invariants),
    )
    outputs = [acc if isinstance(acc, tf.Tensor) else acc.concat() for acc in accumulators]
    return outputs, counts, images


def _valid_mask(feature: tf.Tensor, valid_hw: tf.Tensor) -> tf.Tensor:
    """[B, H, W, 1] mask (feature dtype): 1 inside each image's valid region, 0 in the batch padding."""
    shape = tf.shape(feature)
    rows = tf.range(shape[1])[None, :] < valid_hw[:, 0:1]
    cols = tf.range(shape[2])[None, :] < valid_hw[:, 1:2]
    return tf.cast(rows[:, :, None, None] & cols[:, None, :, None], feature.dtype)


def _replicate_edges(feature: tf.Tensor, valid_hw: tf.Tensor) -> tf.Tensor:
    """Replace the padding beyond each image's valid region by its last valid row / column, so that bilinear
    sampling one pixel past the edge reads what tensorpack's SYMMETRIC pad gives."""
    shape = tf.shape(feature)
    rows = tf.minimum(tf.range(shape[1])[None, :], valid_hw[:, 0:1] - 1)
    cols = tf.minimum(tf.range(shape[2])[None, :], valid_hw[:, 1:2] - 1)
    feature = tf.gather(feature, rows, axis=1, batch_dims=1)
    return tf.gather(feature, cols, axis=2, batch_dims=1)


class MaskRCNN(tf.Module):
    """tensorpack's ResNet-FPN Mask R-CNN at inference; weights from a :class:`ModelBundle`.

    ``compute_dtype``: tf.float32, tf.bfloat16 or tf.float16 for the convolutions and hidden FC layers.
    ``jit_compile``: compile the dense part (backbone, FPN, RPN head) with XLA; it is traced per input shape.
    ``winograd``: run the float32 3x3 stride-1 convolutions with at least ``winograd_min_channels`` input channels
    (the FPN / RPN ones only at feature strides 4-16) by Winograd F(4x4, 3x3) (XLA-compiled per canvas size, see
    :meth:`detect`); float32 only.
    ``masked_padding``: mask the batch padding beyond each image's own multiple of 32 (see the module docstring);
    False is only correct when every image of a call pads to the call's size.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        compute_dtype: tf.DType = tf.float32,
        jit_compile: bool = False,
        winograd: bool = False,
        masked_padding: bool = True,
        winograd_min_channels: int = WINOGRAD_MIN_CHANNELS,
    ) -> None:
        super().__init__(name="maskrcnn")
        cfg, arch = bundle.inference, bundle.architecture
        if winograd and compute_dtype != tf.float32:
            raise ValueError("Winograd convolutions are for float32 only")
        self.compute_dtype = compute_dtype
        self.winograd = winograd
        self.winograd_min_channels = winograd_min_channels
        self.masked_padding = masked_padding
        self.blocks = tuple(arch.resnet_num_blocks)
        self.num_classes = arch.num_categories + 1
        self.has_masks = arch.is_mask_rcnn
        self.strides = cfg.anchor_strides
        self.box_clip = cfg.box_clip
        self.reg_weights = cfg.bbox_reg_weights
        self.rpn_topk = cfg.rpn_per_level_topk
        self.rpn_nms = cfg.rpn_nms_threshold
        self.rpn_min_size = cfg.rpn_min_size
        self.frcnn_nms = cfg.frcnn_nms_threshold
        self.pixel_mean = np.asarray(cfg.pixel_mean_bgr, np.float32)
        self.inv_pixel_std = (1.0 / np.asarray(cfg.pixel_std_bgr, np.float64)).astype(np.float32)
        self.anchors = [
            tf.constant(a) for a in fpn_anchors(self.strides, cfg.anchor_sizes, cfg.anchor_ratios, cfg.max_size)
        ]
        self.params = self._build_params(bundle)
        # (feature stride, input channels, output channels) of each map the traced graphs convolve by Winograd
        # outside the mask head, recorded as they are traced: at a canvas of H x W their programs are those of
        # (H / stride) x (W / stride) maps (the mask head's stack runs at one size, whatever the image).
        self.winograd_maps: set[tuple[int, int, int]] = set()
        self._dense = tf.function(self._dense_impl, jit_compile=jit_compile, autograph=False)

    # ----------------------------------------------------------------------------------------------- weights
    def _build_params(self, bundle: ModelBundle) -> dict[str, tf.Variable]:
        """Variables named like the checkpoint scopes; BN folded into ``<conv>/W`` and ``<conv>/b``; with Winograd,
        also ``<conv>/U``, the transformed kernel of each conv that may run by Winograd."""
        weights, low = bundle.weights, self.compute_dtype
        values: dict[str, tuple[np.ndarray, tf.DType]] = {}

        backbone = ["conv0"]
        for group, count in enumerate(self.blocks):
            for block in range(count):
                prefix = f"group{group}/block{block}"
                backbone += [f"{prefix}/conv{i}" for i in (1, 2, 3)]
                if block == 0:
                    backbone.append(f"{prefix}/convshortcut")
        for scope in backbone:
            kernel, bias = fold_frozen_bn(weights, scope)
            values[f"{scope}/W"], values[f"{scope}/b"] = (kernel, low), (bias, low)
        high_precision = {"rpn/class", "rpn/box", "fastrcnn/outputs/class", "fastrcnn/outputs/box", "maskrcnn/conv"}
        for name, value in weights.items():
            scope = name.rsplit("/", 1)[0]
            if scope.startswith(("fpn/", "rpn/", "fastrcnn/", "maskrcnn/")) and name.endswith(("/W", "/b")):
                if name == "fastrcnn/fc6/W":
                    value = bundle.fc6_weight_channel_last(BOX_RESOLUTION)
                values[name] = (value, tf.float32 if scope in high_precision else low)
        if self.winograd:
            for name, (kernel, _) in list(values.items()):
                scope = name[: -len("/W")]
                if name.endswith("/W") and self._winograd_scope(scope, kernel.shape):
                    values[f"{scope}/U"] = (winograd.transform_kernel(kernel), tf.float32)
        return {
            name: tf.Variable(tf.cast(value, dtype), trainable=False, name=name.replace("/", "_"))
            for name, (value, dtype) in values.items()
        }

    def _winograd_scope(self, scope: str, kernel_shape) -> bool:
        """Whether some call of ``scope`` (a 3x3 stride-1 conv; FPN / RPN ones at WINOGRAD_STRIDES) may use Winograd."""
        if tuple(kernel_shape[:2]) != (3, 3) or kernel_shape[2] < self.winograd_min_channels:
            return False
        if scope.startswith("group"):
            group, block = int(scope[5]), int(scope.split("/")[1][5:])
            # Every stride-1 conv2 (group 3's 512-channel ones too: 25x34 maps, 15 vs 20 ms).
            return scope.endswith("/conv2") and (group == 0 or block > 0)
        if scope.startswith("fpn/posthoc_3x3_p"):
            return self.strides[int(scope[-1]) - 2] in WINOGRAD_STRIDES
        return scope == "rpn/conv0" or scope.startswith("maskrcnn/fcn")  # rpn/conv0: Winograd on P2-P4 only

    # --------------------------------------------------------------------------------------------- layers
    def _conv(self, x: tf.Tensor, scope: str, stride: int = 1, padding: str = "SAME", relu: bool = True):
        kernel, bias = self.params[f"{scope}/W"], self.params[f"{scope}/b"]
        x = tf.nn.bias_add(tf.nn.conv2d(tf.cast(x, kernel.dtype), kernel, stride, padding), bias)
        return tf.nn.relu(x) if relu else x

    def _conv3x3(
        self, x: tf.Tensor, scope: str, stride: int, mask: tf.Tensor | None, relu: bool, canvas: tf.Tensor | None
    ) -> tf.Tensor:
        """A SAME 3x3 stride-1 conv at feature ``stride``; ``mask`` zeroes the batch padding first (None: none).
        Winograd (where the layer has it) runs the map on the ``canvas`` image size divided by the stride, or the
        direct convolution when the canvas is (0, 0) or None."""
        if mask is not None:
            x = x * tf.cast(mask, x.dtype)
        transformed = self.params.get(f"{scope}/U")
        if transformed is None or canvas is None or (scope == "rpn/conv0" and stride not in WINOGRAD_STRIDES):
            return self._conv(x, scope, relu=relu)
        self.winograd_maps.add((stride, *transformed.shape[1:]))
        return winograd.conv3x3(x, self.params[f"{scope}/W"], transformed, self.params[f"{scope}/b"], relu,
                                canvas // stride)

    def _fc(self, x: tf.Tensor, scope: str, relu: bool = True) -> tf.Tensor:
        kernel, bias = self.params[f"{scope}/W"], self.params[f"{scope}/b"]
        x = tf.nn.bias_add(tf.matmul(tf.cast(x, kernel.dtype), kernel), bias)
        return tf.nn.relu(x) if relu else x

    def _bottleneck(
        self, x: tf.Tensor, prefix: str, stride: int, feature_stride: int, mask: tf.Tensor | None,
        canvas: tf.Tensor | None,
    ) -> tf.Tensor:
        y = self._conv(x, f"{prefix}/conv1")
        if stride == 2:
            # tensorpack's AlignPadding: pad top/left by 1, VALID. Reads only valid rows, so no mask is needed.
            y = tf.pad(y, [[0, 0], [1, 0], [1, 0], [0, 0]])
            y = self._conv(y, f"{prefix}/conv2", stride=2, padding="VALID")
        else:
            y = self._conv3x3(y, f"{prefix}/conv2", feature_stride, mask, relu=True, canvas=canvas)
        y = self._conv(y, f"{prefix}/conv3", relu=False)
        if f"{prefix}/convshortcut/W" in self.params:
            x = self._conv(x, f"{prefix}/convshortcut", stride=stride, relu=False)
        return tf.nn.relu(y + x)

    def _backbone_fpn(self, image: tf.Tensor, image_hw: tf.Tensor, canvas: tf.Tensor | None) -> list[tf.Tensor]:
        """P2..P6 (compute dtype) of a [B, H, W, 3] normalized batch, H and W multiples of 32."""
        x = tf.pad(image, [[0, 0], [3, 2], [3, 2], [0, 0]])
        x = self._conv(x, "conv0", stride=2, padding="VALID")
        x = tf.pad(x, [[0, 0], [1, 0], [1, 0], [0, 0]])  # zeros are safe: the inputs are >= 0 after ReLU
        x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        features = []
        for group, count in enumerate(self.blocks):
            mask = None  # valid region at this group's stride; only stride-1 blocks need it
            for block in range(count):
                stride = 2 if group > 0 and block == 0 else 1
                if stride == 1 and mask is None:
                    mask = self._padding_mask(x, image_hw, RESNET_GROUP_STRIDES[group])
                x = self._bottleneck(x, f"group{group}/block{block}", stride, RESNET_GROUP_STRIDES[group], mask,
                                     canvas)
            features.append(x)

        laterals = [self._conv(c, f"fpn/lateral_1x1_c{i + 2}", relu=False) for i, c in enumerate(features)]
        summed = [laterals[-1]]
        for lateral in laterals[-2::-1]:
            summed.append(lateral + tf.repeat(tf.repeat(summed[-1], 2, axis=1), 2, axis=2))
        outputs = []
        for i, s in enumerate(summed[::-1]):
            mask = self._padding_mask(s, image_hw, self.strides[i])
            outputs.append(self._conv3x3(s, f"fpn/posthoc_3x3_p{i + 2}", self.strides[i], mask, False, canvas))
        return outputs + [outputs[-1][:, ::2, ::2, :]]

    def _padding_mask(self, feature: tf.Tensor, image_hw: tf.Tensor, stride: int) -> tf.Tensor | None:
        """The valid-region mask at ``stride``, or None when the padding needs no masking."""
        return _valid_mask(feature, valid_feature_hw(image_hw, stride)) if self.masked_padding else None

    def _dense_impl(self, images: tf.Tensor, image_hw: tf.Tensor, canvas: tf.Tensor | None):
        """Normalize, backbone, FPN and RPN head. Returns (P2..P5 float32, per-level RPN logits [B, h, w, A] and
        deltas [B, h, w, A, 4], float32)."""
        normalized = (tf.cast(images, tf.float32) - self.pixel_mean) * self.inv_pixel_std
        normalized *= _valid_mask(normalized, image_hw)
        features = self._backbone_fpn(tf.cast(normalized, self.compute_dtype), image_hw, canvas)
        # rpn/class and rpn/box as one 1x1 conv (A + 4A outputs): one pass over each level instead of two.
        num_anchors = self.params["rpn/class/W"].shape[-1]
        kernel = tf.concat([self.params["rpn/class/W"], self.params["rpn/box/W"]], axis=3)
        bias = tf.concat([self.params["rpn/class/b"], self.params["rpn/box/b"]], axis=0)
        logits, deltas = [], []
        for stride, feature in zip(self.strides, features, strict=True):
            mask = self._padding_mask(feature, image_hw, stride)
            hidden = tf.cast(self._conv3x3(feature, "rpn/conv0", stride, mask, True, canvas), tf.float32)
            outputs = tf.nn.bias_add(tf.nn.conv2d(hidden, kernel, 1, "SAME"), bias)
            shape = tf.shape(outputs)
            logits.append(outputs[..., :num_anchors])
            deltas.append(tf.reshape(outputs[..., num_anchors:], [shape[0], shape[1], shape[2], num_anchors, 4]))
        pooled = [tf.cast(f, tf.float32) for f in features[: tf_ops.FPN_ROI_LEVELS]]
        return pooled, logits, deltas

    # ------------------------------------------------------------------------------------------ inference
    def detect(
        self,
        images: tf.Tensor,
        image_hw: tf.Tensor,
        score_threshold: tf.Tensor,
        max_detections: tf.Tensor,
        winograd_canvas: tf.Tensor | None = None,
        with_embeddings: bool = False,
    ) -> dict[str, tf.Tensor]:
        """Detect objects in a batch of any size: one traced graph serves every batch size (the per-image steps,
        proposals and per-class NMS, run in a ``tf.map_fn`` over the images).

        images: [B, H, W, 3] uint8 BGR, resized, zero-padded bottom/right, H and W multiples of 32.
        image_hw: [B, 2] int32 resized (unpadded) size of each image.
        winograd_canvas: (2,) int32, with Winograd: the image size, at least (H, W) and a multiple of 32, at which
        the Winograd convolutions run (zero-padded; see :func:`.winograd.conv3x3`); (0, 0) or None: the direct
        convolutions (the mask head's Winograd stack runs either way).
        Returns ``boxes`` (D, 4) float32 in resized-image pixels, ``scores`` (D,), ``labels`` (D,) int32 in 1..K,
        ``masks`` (D, 28, 28) float32 probabilities (absent without a mask head) and ``counts`` (B,) int32: the
        detections of image b are rows ``sum(counts[:b]) ..`` of each output, in descending score order. With
        ``with_embeddings`` (a Python bool: traced separately) also ``embeddings`` (D, C + K + 1) and
        ``image_embeddings`` (B, C) (:mod:`.embeddings`).
        """
        batch = tf.shape(image_hw)[0]
        features, rpn_logits, rpn_deltas = self._dense(images, image_hw, winograd_canvas)
        (rois,), roi_counts, roi_images = _per_image(
            lambda b: [self._proposals(rpn_logits, rpn_deltas, image_hw, b)], batch, [tf.float32])

        roi_features = features
        if self.masked_padding:
            roi_features = [
                _replicate_edges(f, valid_feature_hw(image_hw, s)) for f, s in zip(features, self.strides, strict=False)
            ]
        roi_features = [tf_ops.pad_edges(f) for f in roi_features]  # once for both heads
        roi_ends = tf.cumsum(roi_counts)
        pooled = tf_ops.multilevel_roi_align(
            roi_features, rois, self.strides, BOX_RESOLUTION, roi_images, edge_padded=True
        )
        hidden = tf.reshape(pooled, [-1, BOX_RESOLUTION * BOX_RESOLUTION * pooled.shape[-1]])
        hidden = self._fc(self._fc(hidden, "fastrcnn/fc6"), "fastrcnn/fc7")
        class_probs = tf.nn.softmax(self._fc(tf.cast(hidden, tf.float32), "fastrcnn/outputs/class", relu=False))
        box_deltas = tf.reshape(
            self._fc(tf.cast(hidden, tf.float32), "fastrcnn/outputs/box", relu=False), [-1, self.num_classes, 4]
        )

        def predictions(b: tf.Tensor) -> list[tf.Tensor]:
            rows = slice(roi_ends[b] - roi_counts[b], roi_ends[b])
            decoded = tf_ops.decode_fastrcnn_boxes(box_deltas[rows], rois[rows], self.reg_weights, self.box_clip,
                                                   image_hw[b])
            probs = class_probs[rows]
            boxes, scores, labels, sources = tf_ops.fastrcnn_predictions(
                decoded, probs, score_threshold, max_detections, self.frcnn_nms
            )
            return [boxes, scores, labels, tf.gather(probs, sources)]

        (boxes, scores, labels, det_probs), counts, box_images = _per_image(
            predictions, batch, [tf.float32, tf.float32, tf.int32, tf.float32])
        outputs = {"boxes": boxes, "scores": scores, "labels": labels, "counts": counts}
        if self.has_masks:
            outputs["masks"] = self._mask_head(roi_features, boxes, box_images, labels)
        if with_embeddings:
            outputs["embeddings"] = embeddings.instance_embeddings(
                roi_features, boxes, self.strides, det_probs, box_images
            )
            outputs["image_embeddings"] = embeddings.image_embeddings(
                features[3], valid_feature_hw(image_hw, self.strides[3])
            )
        return outputs

    def _proposals(
        self, rpn_logits: list[tf.Tensor], rpn_deltas: list[tf.Tensor], image_hw: tf.Tensor, b: tf.Tensor
    ) -> tf.Tensor:
        """Image ``b``'s FPN proposals from the RPN outputs of its valid region: (P, 4) float32 boxes in
        resized-image pixels."""
        level_boxes, level_logits = [], []
        for level, stride in enumerate(self.strides):
            valid = valid_feature_hw(image_hw[b : b + 1], stride)[0]
            logits = tf.reshape(rpn_logits[level][b, : valid[0], : valid[1]], [-1])
            deltas = tf.reshape(rpn_deltas[level][b, : valid[0], : valid[1]], [-1, 4])
            anchors = tf.reshape(self.anchors[level][: valid[0], : valid[1]], [-1, 4])
            level_boxes.append(tf_ops.decode_boxes(deltas, anchors, self.box_clip))
            level_logits.append(logits)
        boxes, _ = tf_ops.generate_fpn_proposals(
            level_boxes, level_logits, image_hw[b], self.rpn_topk, self.rpn_nms, self.rpn_min_size
        )
        return boxes

    def _mask_head(self, features, boxes: tf.Tensor, box_images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """(D, 28, 28) sigmoid probabilities of each detection's own class; ``features`` went through pad_edges."""
        x = tf_ops.multilevel_roi_align(features, boxes, self.strides, MASK_RESOLUTION, box_images, edge_padded=True)
        scopes = [f"maskrcnn/fcn{i}" for i in range(4)]
        if all(f"{scope}/U" in self.params for scope in scopes):
            x = winograd.conv3x3_relu_stack(
                x, [self.params[f"{s}/U"] for s in scopes], [self.params[f"{s}/b"] for s in scopes]
            )
        else:
            for scope in scopes:
                x = self._conv(x, scope)
        blocks = self._upsample_deconv_relu(x)  # (D, 14, 14, 2, 2, C): output pixel (2i + dy, 2j + dx)
        # Only the detection's own class channel is used: one dot product per pixel instead of all K channels. It
        # is taken before the 2x2 blocks are interleaved into 28x28, so that only the small logits are shuffled.
        kernel = tf.gather(self.params["maskrcnn/conv/W"][0, 0], labels - 1, axis=1)  # (C, D)
        bias = tf.gather(self.params["maskrcnn/conv/b"], labels - 1)
        logits = tf.einsum("dhwyxc,cd->dhwyx", tf.cast(blocks, tf.float32), kernel) + bias[:, None, None, None, None]
        return tf.sigmoid(tf.reshape(tf.transpose(logits, [0, 1, 3, 2, 4]), [-1, MASK_SIZE, MASK_SIZE]))

    def _upsample_deconv_relu(self, x: tf.Tensor) -> tf.Tensor:
        """ReLU of ``maskrcnn/deconv`` (2x2 kernel, stride 2, SAME) as one 1x1 convolution to 2x2x``out`` channels
        + bias + ReLU: every input pixel writes its own 2x2 output block, ``out[2i + dy, 2j + dx] = x[i, j] @
        W[dy, dx].T`` with W in [kh, kw, out, in] layout. Returns the blocks un-interleaved, (N, 14, 14, 2, 2, out) =
        [n, i, j, dy, dx]. (The same sums as a matmul over the flattened pixels; as a 1x1 convolution oneDNN runs
        it on AMX tiles in bfloat16: 22 against 136 ms for 100 RoIs on a Xeon with AMX, and as fast in float32.)"""
        kernel, bias = self.params["maskrcnn/deconv/W"], self.params["maskrcnn/deconv/b"]
        out_channels = kernel.shape[2]
        weight = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [1, 1, kernel.shape[3], 4 * out_channels])
        y = tf.nn.conv2d(x, weight, 1, "VALID")  # (N, 14, 14, 2*2*out)
        y = tf.nn.relu(tf.nn.bias_add(y, tf.tile(bias, [4])))
        return tf.reshape(y, [-1, MASK_RESOLUTION, MASK_RESOLUTION, 2, 2, out_channels])
