"""TensorFlow building blocks of tensorpack's FPN Mask R-CNN inference (docs/model-conventions.md).

Plain TF functions that work in graph mode (the tensorpack backend) and eagerly (tests). Layout NHWC, batch 1.
Boxes are (x1, y1, x2, y2) float32 in network-input pixels ("fpcoor": continuous coordinates, pixel (i, j)
covers [j, j+1) x [i, i+1)), unless a docstring says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

FPN_ROI_LEVELS = 4  # RoIs are pooled from P2..P5; P6 only feeds the RPN


def decode_boxes(deltas: tf.Tensor, anchors: tf.Tensor, clip: float) -> tf.Tensor:
    """Apply (tx, ty, tw, th) deltas to anchors of the same shape (..., 4).

    ``xc = tx * wa + xa``, ``w = exp(min(tw, clip)) * wa`` (same for y), no +1; ``clip`` is log(MAX_SIZE / 16).
    """
    anchor_xy1, anchor_xy2 = anchors[..., 0:2], anchors[..., 2:4]
    anchor_wh = anchor_xy2 - anchor_xy1
    anchor_centre = (anchor_xy1 + anchor_xy2) * 0.5
    centre = deltas[..., 0:2] * anchor_wh + anchor_centre
    wh = tf.exp(tf.minimum(deltas[..., 2:4], clip)) * anchor_wh
    return tf.concat([centre - wh * 0.5, centre + wh * 0.5], axis=-1)


def clip_boxes(boxes: tf.Tensor, image_hw: tf.Tensor) -> tf.Tensor:
    """Clip (..., 4) boxes to [0, W] x [0, H] of the unpadded network input (``image_hw`` = [H, W])."""
    hw = tf.cast(image_hw, tf.float32)
    upper = tf.stack([hw[1], hw[0], hw[1], hw[0]])
    return tf.minimum(tf.maximum(boxes, 0.0), upper)


def roi_align(
    featuremap: tf.Tensor,
    boxes: tf.Tensor,
    resolution: int,
    box_indices: tf.Tensor | None = None,
    edge_padded: bool = False,
) -> tf.Tensor:
    """tensorpack's RoIAlign: half-pixel aligned, 2x2 bilinear samples per bin, averaged.

    featuremap: [B, H, W, C]; boxes: (N, 4) in feature-map pixels (image boxes / stride); box_indices: (N,) int32
    image of each box in the batch (None: all from image 0, the batch-1 case).
    Returns (N, resolution, resolution, C). The map is padded by one edge-replicated pixel per side (boxes shift
    by +1; ``edge_padded``: the caller has already padded it with :func:`pad_edges`); ``crop_and_resize`` samples
    a (2r x 2r) grid whose first point is ``x0 + spacing/2 - 0.5`` in pixel-index units (pixel k's value sits at
    k); 2x2 average pooling gives r x r.
    """
    padded = featuremap if edge_padded else pad_edges(featuremap)
    boxes = boxes + 1.0
    crop = 2 * resolution
    x0, y0, x1, y1 = tf.split(boxes, 4, axis=1)
    spacing_w = (x1 - x0) / crop
    spacing_h = (y1 - y0) / crop
    shape = tf.shape(padded)
    max_y = tf.cast(shape[1] - 1, tf.float32)
    max_x = tf.cast(shape[2] - 1, tf.float32)
    ny0 = (y0 + spacing_h / 2 - 0.5) / max_y
    nx0 = (x0 + spacing_w / 2 - 0.5) / max_x
    nh = spacing_h * (crop - 1) / max_y
    nw = spacing_w * (crop - 1) / max_x
    normalized = tf.concat([ny0, nx0, ny0 + nh, nx0 + nw], axis=1)
    if box_indices is None:
        box_indices = tf.zeros([tf.shape(boxes)[0]], dtype=tf.int32)
    crops = tf.image.crop_and_resize(padded, normalized, box_indices, [crop, crop])
    return tf.nn.avg_pool2d(crops, ksize=2, strides=2, padding="SAME")


def pad_edges(featuremap: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] -> [B, H + 2, W + 2, C], one edge-replicated pixel per side: what :func:`roi_align` samples."""
    return tf.pad(featuremap, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")


def fpn_levels(boxes: tf.Tensor) -> tf.Tensor:
    """Index 0..3 (P2..P5) of each (N, 4) box as float32 whole numbers: ``floor(4 + log2(sqrt(area) / 224 +
    1e-6))`` clamped to [2, 5], minus 2. Float, not int32, so that on a GPU it stays in device memory: TensorFlow
    keeps int32 tensors of GPU kernels in host memory, which would copy the levels to the host and stall the GPU."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = tf.floor(4.0 + tf.math.log(tf.sqrt(area) * (1.0 / 224) + 1e-6) * (1.0 / math.log(2.0)))
    return tf.clip_by_value(level, 2.0, 5.0) - 2.0


def multilevel_roi_align(
    features: Sequence[tf.Tensor],
    boxes: tf.Tensor,
    strides: Sequence[int],
    resolution: int,
    box_indices: tf.Tensor | None = None,
    edge_padded: bool = False,
) -> tf.Tensor:
    """RoIAlign every (N, 4) image-pixel box on its FPN level; returns (N, r, r, C) in the order of ``boxes``.

    ``box_indices`` (N,) int32 names each box's image when the features hold a batch; ``edge_padded``: the features
    went through :func:`pad_edges` already (see :func:`roi_align`)."""
    levels = fpn_levels(boxes)
    pooled, order = [], []
    for index in range(FPN_ROI_LEVELS):
        ids = tf.reshape(tf.where(tf.equal(levels, float(index))), [-1])
        level_boxes = tf.gather(boxes, ids) * (1.0 / strides[index])
        level_indices = None if box_indices is None else tf.gather(box_indices, ids)
        pooled.append(roi_align(features[index], level_boxes, resolution, level_indices, edge_padded))
        order.append(ids)
    # Each box's result goes back to its own row: gather by the inverse of the level order, found by sorting the row
    # ids as float32 (exact below 2^24 boxes). Not invert_permutation, whose int32 GPU kernel runs on the host, and
    # not a scatter_nd, which costs the CPU twice a gather here (1000 RoIs of 7x7x256: 30 ms against 16 ms).
    rows = tf.cast(tf.concat(order, axis=0), tf.float32)
    return tf.gather(tf.concat(pooled, axis=0), tf.argsort(rows))


def generate_fpn_proposals(
    level_boxes: Sequence[tf.Tensor],
    level_logits: Sequence[tf.Tensor],
    image_hw: tf.Tensor,
    topk: int,
    nms_threshold: float,
    min_size: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """tensorpack's per-level proposals (PROPOSAL_MODE='Level').

    Per level: top-k (k = min(topk, n)) by objectness logit, clip to the image, optional min-size filter, NMS
    (IoU ``nms_threshold``, at most ``topk``). Then the top-k logits over all levels. Inputs per level: boxes (n, 4)
    and logits (n,) flattened in (y, x, anchor) order. Returns boxes (P, 4) and logits (P,), P <= topk, unsorted.
    """
    all_boxes, all_scores = [], []
    for boxes, logits in zip(level_boxes, level_logits, strict=True):
        k = tf.minimum(topk, tf.size(logits))
        top_logits, top_ids = tf.nn.top_k(logits, k=k, sorted=False)
        top_boxes = clip_boxes(tf.gather(boxes, top_ids), image_hw)
        if min_size > 0:
            wh = top_boxes[:, 2:4] - top_boxes[:, 0:2]
            valid = tf.reduce_all(wh > min_size, axis=1)
            top_boxes = tf.boolean_mask(top_boxes, valid)
            top_logits = tf.boolean_mask(top_logits, valid)
        keep = tf.image.non_max_suppression(top_boxes, top_logits, max_output_size=topk, iou_threshold=nms_threshold)
        all_boxes.append(tf.gather(top_boxes, keep))
        all_scores.append(tf.gather(top_logits, keep))
    boxes = tf.concat(all_boxes, axis=0)
    scores = tf.concat(all_scores, axis=0)
    k = tf.minimum(topk, tf.size(scores))
    scores, ids = tf.nn.top_k(scores, k=k, sorted=False)
    return tf.gather(boxes, ids), scores


def decode_fastrcnn_boxes(
    box_deltas: tf.Tensor, proposals: tf.Tensor, reg_weights: Sequence[float], clip: float, image_hw: tf.Tensor
) -> tf.Tensor:
    """Decode class-specific deltas (N, C+1, 4) on proposals (N, 4) into clipped boxes (N, C+1, 4)."""
    deltas = box_deltas / tf.constant(reg_weights, dtype=tf.float32)
    anchors = tf.tile(proposals[:, None, :], [1, tf.shape(box_deltas)[1], 1])
    return clip_boxes(decode_boxes(deltas, anchors, clip), image_hw)


def fastrcnn_predictions(
    boxes: tf.Tensor,
    scores: tf.Tensor,
    score_threshold: tf.Tensor | float,
    max_detections: tf.Tensor | int,
    nms_threshold: float,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-class NMS in one call (docs/model-conventions.md#per-class-nms).

    boxes (N, C+1, 4), scores (N, C+1) softmax with background at 0. Keeps (class, proposal) pairs with score
    strictly above the threshold, offsets each class's boxes by ``class * (max_coord + 1)`` so classes never
    overlap, and runs one NMS with at most ``max_detections`` outputs. Returns boxes (K, 4), scores (K,) in
    descending order, int32 labels (K,) in 1..C, and int32 the index (K,) of the proposal each detection came from
    (its row of ``scores`` is the detection's class distribution).
    """
    boxes = tf.transpose(boxes[:, 1:, :], [1, 0, 2])  # (C, N, 4)
    scores = tf.transpose(scores[:, 1:], [1, 0])  # (C, N)
    max_coord = tf.reduce_max(boxes)
    kept = tf.where(scores > score_threshold)  # (F, 2): (class index, proposal index)
    kept_boxes = tf.gather_nd(boxes, kept)
    kept_scores = tf.gather_nd(scores, kept)
    classes = tf.cast(kept[:, 0], tf.int32)
    offsets = tf.cast(classes, tf.float32)[:, None] * (max_coord + 1.0)
    selection = tf.image.non_max_suppression(
        kept_boxes + offsets, kept_scores, max_output_size=max_detections, iou_threshold=nms_threshold
    )
    proposals = tf.cast(tf.gather(kept[:, 1], selection), tf.int32)
    return (tf.gather(kept_boxes, selection), tf.gather(kept_scores, selection), tf.gather(classes, selection) + 1,
            proposals)

