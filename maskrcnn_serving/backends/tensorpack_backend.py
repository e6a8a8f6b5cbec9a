"""The ``tensorpack`` backend: tensorpack's FPN Mask R-CNN inference graph built with tensorpack's own layers.

Graph mode, batch 1, NHWC (fast on CPU; the seed's NCHW graph is several times slower there). Variable names come
from tensorpack's layer naming, so they match checkpoints by construction; the only layout-dependent weight,
``fastrcnn/fc6/W``, is reordered at load to the NHWC flatten order (see ``ModelBundle.fc6_weight_channel_last``).

Data flow per image: cv2 resize (uint8) -> graph: normalize, pad to 32, ResNet, FPN, RPN, proposals, box head,
per-class NMS, mask head -> boxes / scale, clipped to the original image -> :class:`Detections` (masks pasted
lazily by the accurate paste).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from tensorpack.models import BatchNorm, Conv2D, Conv2DTranspose, FullyConnected, MaxPooling
from tensorpack.tfutils.argscope import argscope
from tensorpack.tfutils.tower import TowerContext

from maskrcnn_serving.backends.base import Backend, PredictOptions
from maskrcnn_serving.errors import ModelLoadError
from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling import tf_ops
from maskrcnn_serving.modeling.anchors import fpn_anchors
from maskrcnn_serving.modeling.preprocess import boxes_to_original, resize_image
from maskrcnn_serving.structures import Detections
from maskrcnn_serving.timing import stage

tf1 = tf.compat.v1

# tensorpack logs every layer's shapes at graph build; keep server logs to what matters.
logging.getLogger("tensorpack").setLevel(logging.WARNING)

_GROUP_WIDTHS = (64, 128, 256, 512)
_BOX_RESOLUTION = 7
_MASK_RESOLUTION = 14


def _bn(x: tf.Tensor) -> tf.Tensor:
    return BatchNorm("bn", x)


def _bn_relu(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.relu(BatchNorm("bn", x))


def _pad_bottom_right(x: tf.Tensor, top_left: int, bottom: tf.Tensor | int, right: tf.Tensor | int) -> tf.Tensor:
    return tf.pad(x, [[0, 0], [top_left, bottom], [top_left, right], [0, 0]])


def _bottleneck(x: tf.Tensor, width: int, stride: int) -> tf.Tensor:
    """ResNet bottleneck with the stride on the 3x3 conv (STRIDE_1X1=False) and tensorpack's "AlignPadding"."""
    shortcut = x
    y = Conv2D("conv1", x, width, 1, activation=_bn_relu)
    if stride == 2:
        y = _pad_bottom_right(y, 1, 0, 0)
        y = Conv2D("conv2", y, width, 3, strides=2, padding="VALID", activation=_bn_relu)
    else:
        y = Conv2D("conv2", y, width, 3, activation=_bn_relu)
    y = Conv2D("conv3", y, width * 4, 1, activation=_bn)
    if shortcut.shape[-1] != width * 4:
        shortcut = Conv2D("convshortcut", shortcut, width * 4, 1, strides=stride, activation=_bn)
    return tf.nn.relu(y + shortcut)


def _resnet(image: tf.Tensor, blocks: Sequence[int]) -> list[tf.Tensor]:
    """C2..C5 of a normalized [1, H, W, 3] image. Pads bottom/right to a multiple of 32 (zeros = mean pixel)."""
    hw = tf.shape(image)[1:3]
    padded_hw = tf.cast(tf.math.ceil(tf.cast(hw, tf.float32) / 32.0) * 32.0, tf.int32)
    extra = padded_hw - hw
    with argscope(Conv2D, use_bias=False):
        x = _pad_bottom_right(image, 3, 2 + extra[0], 2 + extra[1])
        x = Conv2D("conv0", x, 64, 7, strides=2, padding="VALID", activation=_bn_relu)
        x = _pad_bottom_right(x, 1, 0, 0)
        x = MaxPooling("pool0", x, 3, strides=2, padding="VALID")
        features = []
        for group, (count, width) in enumerate(zip(blocks, _GROUP_WIDTHS, strict=True)):
            with tf1.variable_scope(f"group{group}"):
                for block in range(count):
                    with tf1.variable_scope(f"block{block}"):
                        x = _bottleneck(x, width, 2 if group > 0 and block == 0 else 1)
            features.append(x)
    return features


def _fpn(features: Sequence[tf.Tensor], channels: int) -> list[tf.Tensor]:
    """P2..P6: 1x1 laterals, nearest-neighbour top-down sums, 3x3 post-hoc convs; P6 = P5[::2, ::2]."""
    with tf1.variable_scope("fpn"), argscope(Conv2D, use_bias=True, activation=tf.identity):
        laterals = [Conv2D(f"lateral_1x1_c{i + 2}", c, channels, 1) for i, c in enumerate(features)]
        summed = [laterals[-1]]
        for lateral in laterals[-2::-1]:
            upsampled = tf.repeat(tf.repeat(summed[-1], 2, axis=1), 2, axis=2)
            summed.append(lateral + upsampled)
        outputs = [Conv2D(f"posthoc_3x3_p{i + 2}", s, channels, 3) for i, s in enumerate(summed[::-1])]
        p6 = MaxPooling("maxpool_p6", outputs[-1], pool_size=1, strides=2, padding="VALID")
    return outputs + [p6]


def _rpn_level(feature: tf.Tensor, channels: int, num_anchors: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Shared RPN head on one level: logits (fH*fW*A,) and deltas (fH*fW*A, 4) in (y, x, anchor) order."""
    with tf1.variable_scope("rpn", reuse=tf1.AUTO_REUSE):
        hidden = Conv2D("conv0", feature, channels, 3, activation=tf.nn.relu)
        logits = Conv2D("class", hidden, num_anchors, 1)
        deltas = Conv2D("box", hidden, 4 * num_anchors, 1)
    return tf.reshape(logits, [-1]), tf.reshape(deltas, [-1, 4])


class _Graph:
    """The inference graph's input and output tensors."""

    def __init__(self, bundle: ModelBundle) -> None:
        cfg, arch = bundle.config, bundle.architecture
        strides = cfg["FPN.ANCHOR_STRIDES"]
        self.image = tf1.placeholder(tf.uint8, [None, None, 3], name="image")  # resized, BGR
        self.score_threshold = tf1.placeholder_with_default(
            np.float32(cfg["TEST.RESULT_SCORE_THRESH"]), [], name="score_threshold"
        )
        self.max_detections = tf1.placeholder_with_default(
            np.int32(cfg["TEST.RESULTS_PER_IM"]), [], name="max_detections"
        )
        image_hw = tf.shape(self.image)[:2]
        mean_bgr = np.asarray(cfg["PREPROC.PIXEL_MEAN"][::-1], np.float32)
        inv_std_bgr = (1.0 / np.asarray(cfg["PREPROC.PIXEL_STD"][::-1], np.float64)).astype(np.float32)
        normalized = ((tf.cast(self.image, tf.float32) - mean_bgr) * inv_std_bgr)[None]

        with TowerContext("", is_training=False), argscope(
            [Conv2D, Conv2DTranspose, MaxPooling, BatchNorm], data_format="channels_last"
        ):
            features = _fpn(_resnet(normalized, arch.resnet_num_blocks), arch.fpn_channels)

            anchors = fpn_anchors(strides, cfg["RPN.ANCHOR_SIZES"], cfg["RPN.ANCHOR_RATIOS"], cfg.max_size)
            level_boxes, level_logits = [], []
            for feature, level_anchors in zip(features, anchors, strict=True):
                logits, deltas = _rpn_level(feature, arch.fpn_channels, arch.num_anchors)
                fmap_hw = tf.shape(feature)[1:3]
                narrowed = tf.reshape(tf.constant(level_anchors)[: fmap_hw[0], : fmap_hw[1]], [-1, 4])
                level_boxes.append(tf_ops.decode_boxes(deltas, narrowed, cfg.box_clip))
                level_logits.append(logits)
            proposals, _ = tf_ops.generate_fpn_proposals(
                level_boxes, level_logits, image_hw,
                topk=cfg["RPN.TEST_PER_LEVEL_NMS_TOPK"],
                nms_threshold=cfg["RPN.PROPOSAL_NMS_THRESH"],
                min_size=cfg["RPN.MIN_SIZE"],
            )

            num_classes = arch.num_categories + 1
            pooled_features = [tf_ops.pad_edges(f) for f in features[:4]]  # once for both heads
            roi_features = tf_ops.multilevel_roi_align(
                pooled_features, proposals, strides, _BOX_RESOLUTION, edge_padded=True
            )
            with tf1.variable_scope("fastrcnn"):
                hidden = FullyConnected("fc6", roi_features, arch.fc_head_dim, activation=tf.nn.relu)
                hidden = FullyConnected("fc7", hidden, arch.fc_head_dim, activation=tf.nn.relu)
                with tf1.variable_scope("outputs"):
                    class_logits = FullyConnected("class", hidden, num_classes)
                    box_deltas = tf.reshape(FullyConnected("box", hidden, num_classes * 4), [-1, num_classes, 4])
            boxes = tf_ops.decode_fastrcnn_boxes(
                box_deltas, proposals, cfg["FRCNN.BBOX_REG_WEIGHTS"], cfg.box_clip, image_hw
            )
            self.boxes, self.scores, self.labels = tf_ops.fastrcnn_predictions(
                boxes, tf.nn.softmax(class_logits), self.score_threshold, self.max_detections,
                cfg["TEST.FRCNN_NMS_THRESH"],
            )

            self.masks = None
            if arch.is_mask_rcnn:
                mask_features = tf_ops.multilevel_roi_align(
                    pooled_features, self.boxes, strides, _MASK_RESOLUTION, edge_padded=True
                )
                with tf1.variable_scope("maskrcnn"):
                    x = mask_features
                    for i in range(4):
                        x = Conv2D(f"fcn{i}", x, arch.mask_head_dim, 3, activation=tf.nn.relu)
                    x = Conv2DTranspose("deconv", x, arch.mask_head_dim, 2, strides=2, activation=tf.nn.relu)
                    mask_logits = Conv2D("conv", x, arch.num_categories, 1)  # (K, 28, 28, classes)
                self.masks = tf.sigmoid(tf.gather(mask_logits, self.labels - 1, axis=3, batch_dims=1))

    @property
    def outputs(self) -> list[tf.Tensor]:
        return [self.boxes, self.scores, self.labels] + ([self.masks] if self.masks is not None else [])


class TensorpackBackend(Backend):
    """tensorpack-layer graph in a TF1-style session; one image per graph call."""

    name = "tensorpack"

    def __init__(self, bundle: ModelBundle, graph: tf.Graph, session: tf1.Session, tensors: _Graph) -> None:
        super().__init__(bundle)
        self._graph = graph
        self._session = session
        self._tensors = tensors
        self._accurate_paste = bool(bundle.config["MRCNN.ACCURATE_PASTE"])

    @property
    def inference_graph(self) -> tuple[tf.Graph, list[tf.Tensor]]:
        """The session graph and the tensors one image's ``predict`` fetches (for modeling/kernel_audit.py)."""
        return self._graph, self._tensors.outputs

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, intra_op_threads: int = 0) -> TensorpackBackend:
        graph = tf.Graph()
        with graph.as_default():
            tensors = _Graph(bundle)
            variables = tf1.global_variables()
        graph_names = {v.op.name for v in variables}
        if graph_names != set(bundle.weights):
            # Cannot happen unless expected_variables() and the graph disagree: refuse rather than serve junk.
            raise ModelLoadError(
                "Internal error: graph variables differ from the checkpoint's: "
                f"only in graph {sorted(graph_names - set(bundle.weights))[:5]}, "
                f"only in checkpoint {sorted(set(bundle.weights) - graph_names)[:5]}"
            )
        graph.finalize()
        config = tf1.ConfigProto(
            intra_op_parallelism_threads=intra_op_threads,
            allow_soft_placement=True,
            gpu_options=tf1.GPUOptions(allow_growth=True),
        )
        session = tf1.Session(graph=graph, config=config)
        for variable in variables:
            name = variable.op.name
            value = bundle.fc6_weight_channel_last() if name == "fastrcnn/fc6/W" else bundle.weights[name]
            # Variable.load feeds the initializer's value input: no extra ops, and the graph stays finalized.
            session.run(variable.initializer, {variable.initializer.inputs[1]: value})
        return cls(bundle, graph, session, tensors)

    def predict(self, images: Sequence[np.ndarray], options: PredictOptions | None = None) -> list[Detections]:
        return [self._predict_one(image, options or PredictOptions()) for image in images]

    def _predict_one(self, image: np.ndarray, options: PredictOptions) -> Detections:
        cfg = self.bundle.config
        image_hw = (int(image.shape[0]), int(image.shape[1]))
        with stage("preprocess"):
            resized, scale = resize_image(image, cfg.short_edge_size, cfg.max_size)
        feed = {self._tensors.image: resized}
        if options.score_threshold is not None:
            feed[self._tensors.score_threshold] = options.score_threshold
        if options.max_detections is not None:
            feed[self._tensors.max_detections] = options.max_detections
        outputs = self._session.run(self._tensors.outputs, feed)
        boxes, scores, labels = outputs[:3]
        return Detections(
            boxes=boxes_to_original(boxes, scale, image_hw),
            scores=scores,
            labels=labels.astype(np.int64),
            class_names=self.class_names,
            image_hw=image_hw,
            mask_probs=outputs[3] if len(outputs) > 3 else None,
            accurate_paste=self._accurate_paste,
        )

    def close(self) -> None:
        self._session.close()
