"""The typed per-image result that every backend returns: plain arrays in the original image's frame.

Turning it into masks and records is post-processing (:mod:`maskrcnn_serving.postprocess`); nothing here pastes,
encodes or imports a layer above it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """Detections of one image, in descending score order.

    Attributes:
        boxes: (N, 4) float32 (x1, y1, x2, y2) in original-image pixels, "fpcoor" convention (pixel (i, j)
            covers [j, j+1) x [i, i+1); width = x2 - x1, no +1), clipped to [0, W] x [0, H].
        scores: (N,) float32 class probabilities.
        labels: (N,) int64 contiguous class ids 1..K (the training index, not a COCO category id).
        class_names: the model's names; ``class_names[0]`` is "BG", label k is ``class_names[k]``.
        image_hw: (H, W) of the original image.
        mask_probs: (N, M, M) float32 sigmoid mask probabilities in the frame of each box (M = 28), or None for a
            model without a mask head.
        accurate_paste: which paste method post-processing uses for these masks (``MRCNN.ACCURATE_PASTE``; see
            modeling/paste.py).
        embeddings: (N, E) float32 L2-normalised search vectors of the instances, when they were asked for
            (see modeling/embeddings.py); ``image_embedding`` (F,) the image's.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: Sequence[str]
    image_hw: tuple[int, int]
    mask_probs: np.ndarray | None = None
    accurate_paste: bool = True
    embeddings: np.ndarray | None = None
    image_embedding: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def has_masks(self) -> bool:
        return self.mask_probs is not None

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [self.class_names[int(k)] for k in self.labels]

    def select(self, keep: np.ndarray | Sequence[int]) -> Detections:
        """A new Detections with the rows ``keep`` (indices or a boolean mask), order preserved."""
        keep = np.asarray(keep)
        if keep.size == 0:  # numpy reads an empty list as float64, which cannot index
            keep = keep.astype(np.intp)
        return Detections(
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            labels=self.labels[keep],
            class_names=self.class_names,
            image_hw=self.image_hw,
            mask_probs=None if self.mask_probs is None else self.mask_probs[keep],
            embeddings=None if self.embeddings is None else self.embeddings[keep],
            image_embedding=self.image_embedding,
            accurate_paste=self.accurate_paste,
        )
