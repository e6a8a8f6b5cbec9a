"""The typed results: :class:`Detections`, what every backend returns for an image, and :class:`MaskRuns`, one
instance's binary mask as post-processing pastes it. Plain arrays in the original image's frame.

Making them is post-processing (:mod:`maskrcnn_serving.postprocess`, :mod:`maskrcnn_serving.modeling.paste`);
nothing here pastes, encodes or imports a layer above it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
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


@dataclass(frozen=True)
class MaskRuns:
    """One instance's binary mask in an (H, W) image, as the runs of set pixels along its rows.

    A pasted mask is a few runs per row (its outline crosses each row a few times), so runs are what the paste makes
    and what the row-major encoders read, without a value per pixel; :meth:`patch` makes the pixels for the encoders
    that need them (COCO RLE, polygons, drawing).

    Attributes:
        y0, x0: the top-left pixel of the window, the box-sized region that can hold set pixels.
        height, width: the window's size; it lies inside the image.
        image_hw: (H, W) of the image.
        rows, starts, ends: (K,) int64 window coordinates, in row-major order: run k sets the pixels of window row
            ``rows[k]`` from column ``starts[k]`` to ``ends[k] - 1``. Runs are not empty and do not overlap; two runs
            of a row may touch (one's end is the next one's start).
    """

    y0: int
    x0: int
    height: int
    width: int
    image_hw: tuple[int, int]
    rows: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def empty(cls, image_hw: tuple[int, int]) -> MaskRuns:
        """A mask with no pixel set."""
        none = np.zeros(0, np.int64)
        return cls(0, 0, 0, 0, (int(image_hw[0]), int(image_hw[1])), none, none, none)

    @classmethod
    def from_patch(cls, y0: int, x0: int, patch: np.ndarray, image_hw: tuple[int, int]) -> MaskRuns:
        """The runs of a (h, w) {0, 1} ``patch`` placed at rows y0.., cols x0.. (0 elsewhere); the part of the patch
        outside the image is dropped."""
        height, width = int(image_hw[0]), int(image_hw[1])
        y0, x0 = int(y0), int(x0)
        patch = patch[: max(0, height - y0), : max(0, width - x0)]
        if patch.size == 0:
            return cls.empty(image_hw)
        # A zero column on each side separates the rows, so one flat comparison finds every run's start and end.
        padded_width = patch.shape[1] + 2
        padded = np.zeros((patch.shape[0], padded_width), dtype=np.bool_)
        padded[:, 1:-1] = patch
        flat = padded.ravel()
        changes = np.flatnonzero(flat[1:] != flat[:-1])  # start, end, start, end, ... in row-major order
        rows, columns = np.divmod(changes, padded_width)
        return cls(y0, x0, patch.shape[0], patch.shape[1], (height, width), rows[0::2], columns[0::2], columns[1::2])

    @property
    def area(self) -> int:
        """The number of set pixels."""
        return int((self.ends - self.starts).sum())

    def patch(self) -> np.ndarray:
        """The window's pixels: (height, width) uint8 {0, 1}."""
        size = self.height * self.width
        # Run bounds in the flat window; the gaps between them are 0, the runs 1 (a zero-length gap where runs touch).
        bounds = np.empty(2 * len(self.rows) + 2, np.int64)
        bounds[0], bounds[-1] = 0, size
        bounds[1:-1:2] = self.rows * self.width + self.starts
        bounds[2:-1:2] = self.rows * self.width + self.ends
        values = np.zeros(len(bounds) - 1, np.uint8)
        values[1::2] = 1
        return np.repeat(values, np.diff(bounds)).reshape(self.height, self.width)

    def transposed(self) -> MaskRuns:
        """The same mask in the transposed image (W, H): its runs are the columns of this one."""
        transposed = cv2.transpose(self.patch()) if self.height and self.width else np.zeros((0, 0), np.uint8)
        return MaskRuns.from_patch(self.x0, self.y0, transposed, (self.image_hw[1], self.image_hw[0]))
