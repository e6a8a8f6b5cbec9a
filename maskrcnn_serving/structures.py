"""Typed per-image results that every backend returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from maskrcnn_serving.modeling.paste import paste_mask_patch, paste_masks


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
        accurate_paste: which paste method ``masks()`` uses (``MRCNN.ACCURATE_PASTE``; see modeling/paste.py).
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
    _mask_cache: dict[float, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def has_masks(self) -> bool:
        return self.mask_probs is not None

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [self.class_names[int(k)] for k in self.labels]

    def masks(self, threshold: float = 0.5) -> np.ndarray:
        """(N, H, W) uint8 {0, 1} full-image masks (cached per threshold). Prefer :meth:`mask_patches` for large
        images: N full-size masks of a 4000x3000 photo take N x 12 MB."""
        if self.mask_probs is None:
            raise ValueError("This model has no mask head (MODE_MASK=False).")
        if threshold not in self._mask_cache:
            self._mask_cache[threshold] = paste_masks(
                self.boxes, self.mask_probs, self.image_hw, threshold, self.accurate_paste
            )
        return self._mask_cache[threshold]

    def mask_patches(self, threshold: float = 0.5) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(y0, x0, patch)`` per detection: the mask is ``patch`` at rows y0.., cols x0.., 0 elsewhere."""
        if self.mask_probs is None:
            raise ValueError("This model has no mask head (MODE_MASK=False).")
        for box, prob in zip(self.boxes, self.mask_probs, strict=True):
            yield paste_mask_patch(box, prob, self.image_hw, threshold, self.accurate_paste)

    def select(self, keep: np.ndarray | Sequence[int]) -> Detections:
        """A new Detections with the rows ``keep`` (indices or a boolean mask), order preserved."""
        keep = np.asarray(keep)
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
