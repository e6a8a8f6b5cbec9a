"""Search vectors of detected instances and of whole images, computed in the detection graph (both networks).

**Instance embedding** (D, C + K + 1), float32, L2-normalised: each final box is pooled (RoIAlign 7x7, the box
head's sampling) on EVERY FPN level P2-P5, max over the 7x7 bins; the four per-level vectors are L2-normalised and
averaged, then L2-normalised (the appearance part, C values); the class distribution of the proposal the detection
came from (K + 1 softmax values, background first; its entry at the label is the detection's score), L2-normalised
and weighted by :data:`CLASS_WEIGHT`, is appended; the whole is L2-normalised. Cosine similarity of two instances
is the dot product of their vectors.

**Image embedding** (C,), float32, L2-normalised: the mean of P5 over the image's own extent (its resized size
padded to a multiple of 32, at stride 32).

Why this recipe (measured on the trained fixtures, docs/instance-search.md): pooling on every level re-identifies an
object in a rescaled, re-encoded copy of its image far more often than the box head's features (top-1 re-id 0.95
against 0.88), but on its own says little about the class (10 nearest neighbours of the same class 0.55); the
detection's own class distribution carries the class. Weights of 0.1-0.5 all met both goals on both fixtures; 0.15
is the most balanced. No fitted state (centring, whitening): the vectors of one model are comparable across
collections.

Frames: boxes are (x1, y1, x2, y2) in network-input (resized) pixels, the boxes the mask head pools; the features
are float32 maps exactly as the heads' RoIAlign reads them (after :func:`tf_ops.pad_edges`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from maskrcnn_serving.modeling import tf_ops
from maskrcnn_serving.modeling.constants import BOX_RESOLUTION

CLASS_WEIGHT = 0.15  # of the class part, after each part is L2-normalised  (length: constants.embedding_dim)


def instance_embeddings(
    padded_features: Sequence[tf.Tensor],
    boxes: tf.Tensor,
    strides: Sequence[int],
    class_probs: tf.Tensor,
    box_indices: tf.Tensor | None = None,
) -> tf.Tensor:
    """(D, C + K + 1) vectors of ``boxes`` (D, 4); ``class_probs`` (D, K + 1) is each detection's softmax row;
    ``box_indices`` (D,) names each box's image when the features hold a batch."""
    per_level = []
    for level in range(tf_ops.FPN_ROI_LEVELS):
        pooled = tf_ops.roi_align(
            padded_features[level], boxes * (1.0 / strides[level]), BOX_RESOLUTION, box_indices, edge_padded=True
        )
        per_level.append(tf.math.l2_normalize(tf.reduce_max(tf.cast(pooled, tf.float32), axis=[1, 2]), axis=1))
    appearance = tf.math.l2_normalize(tf.add_n(per_level) * (1.0 / len(per_level)), axis=1)
    classes = tf.math.l2_normalize(tf.cast(class_probs, tf.float32), axis=1)
    return tf.math.l2_normalize(tf.concat([appearance, CLASS_WEIGHT * classes], axis=1), axis=1)


def image_embeddings(p5: tf.Tensor, valid_hw: tf.Tensor) -> tf.Tensor:
    """(B, C) vectors of a batch: the mean of ``p5`` [B, H, W, C] (before edge padding) over each image's valid
    (rows, cols) ``valid_hw`` (B, 2), L2-normalised."""
    shape = tf.shape(p5)
    rows = tf.range(shape[1])[None, :] < valid_hw[:, 0:1]
    cols = tf.range(shape[2])[None, :] < valid_hw[:, 1:2]
    mask = tf.cast(rows[:, :, None, None] & cols[:, None, :, None], tf.float32)
    total = tf.reduce_sum(tf.cast(p5, tf.float32) * mask, axis=[1, 2])
    return tf.math.l2_normalize(total / tf.reduce_sum(mask, axis=[1, 2]), axis=1)
