"""Look at results: decode the server's mask formats back to binary masks and draw detections on images.

Frames: images are BGR uint8 (H, W, 3) as cv2 reads them; masks are uint8 {0, 1} (H, W) in the same pixels;
boxes are drawn from COCO ``bbox`` [x, y, w, h] (continuous coordinates, pixel (i, j) covers [j, j+1) x [i, i+1))
or from :class:`~maskrcnn_serving.structures.Detections` (x1, y1, x2, y2, same convention).

Mask formats (the server's ``format`` option):

* ``legacy``: the seed containers' ``{"counts": [int, ...], "size": [H, W]}``: run lengths of a **row-major** scan,
  alternating zeros and ones, starting with a count of zeros (which may be 0). pycocotools would read these counts
  column-major and silently produce a wrong mask, so they are decoded here with ``np.repeat``.
* ``coco``: standard COCO RLE, **column-major**; ``counts`` is a compressed str (or bytes), or, in the uncompressed
  form, a list of ints. Decoded with pycocotools.
* ``polygon``: COCO polygons, a list of flat ``[x1, y1, x2, y2, ...]`` rings in continuous coordinates, filled with
  ``cv2.fillPoly`` (pixels whose centres are inside or on a ring; the exact inverse of the server's polygons).
* ``boxes``: no ``segmentation``.

Nothing here imports matplotlib at module import time: the server imports :func:`class_color` (``GET /model`` gives
the web page its colours), and :func:`plot_annotations` loads matplotlib when it is called.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn_serving.postprocess import instance_masks

if TYPE_CHECKING:  # pragma: no cover - typing only
    from maskrcnn_serving.structures import Detections

# (y0, x0, patch): an instance's mask is ``patch`` (h, w) uint8 {0, 1} at rows y0.., cols x0.., 0 elsewhere.
MaskPatch = tuple[int, int, np.ndarray]

MASK_FORMATS = ("auto", "legacy", "coco", "polygon")
_POLYGON_SHIFT = 8  # fractional bits of polygon vertices given to cv2.fillPoly


# --------------------------------------------------------------------------------------------------- decoders


def decode_legacy_rle(counts: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Decode the seed containers' row-major RLE to an (H, W) uint8 mask.

    ``counts`` alternate zeros and ones and start with zeros: ``[1, 2, 2, 1]`` with size [2, 3] is
    ``[[0, 1, 1], [0, 0, 1]]``. Raises ValueError when the counts do not add up to H * W or one is negative.
    """
    height, width = (int(v) for v in size)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any():
        raise ValueError("legacy RLE counts must be a flat list of non-negative ints")
    if int(runs.sum()) != height * width:
        raise ValueError(f"legacy RLE counts add up to {int(runs.sum())}, expected H * W = {height * width}")
    values = (np.arange(len(runs)) % 2).astype(np.uint8)  # 0, 1, 0, 1, ...: the first run is zeros
    return np.repeat(values, runs).reshape(height, width)


def decode_coco_rle(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (column-major; compressed str/bytes ``counts`` or an uncompressed int list) to (H, W)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    elif isinstance(counts, str | bytes):
        compressed = {"counts": counts.encode("ascii") if isinstance(counts, str) else counts, "size": [height, width]}
    else:
        raise ValueError(f"COCO RLE counts must be a str, bytes or a list of ints, not {type(counts).__name__}")
    return np.ascontiguousarray(mask_utils.decode(compressed), dtype=np.uint8)


def decode_polygons(polygons: Sequence[Sequence[float]], image_hw: Sequence[int]) -> np.ndarray:
    """Rasterize COCO polygons (flat ``[x1, y1, x2, y2, ...]`` rings, continuous coordinates) to (H, W) uint8.

    A pixel (i, j) is set when its centre (j + 0.5, i + 0.5) lies inside a ring or on its outline, as
    ``cv2.fillPoly`` draws it (vertices to 1/256 pixel; a centre exactly half a pixel outside an edge counts as on
    it). Rings are united, as in COCO. This inverts the server's ``polygon`` format exactly (its vertices are the
    centres of boundary pixels) for masks without holes, where pycocotools' rasterizer would drop part of the
    boundary. An empty list gives an all-zero mask.
    """
    height, width = (int(v) for v in image_hw)
    mask = np.zeros((height, width), dtype=np.uint8)
    scale = 1 << _POLYGON_SHIFT
    for ring in polygons:
        points = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        # Pixel-index frame (centres on integers), in cv2's fixed point; one call per ring = union, not even-odd.
        fixed = np.round((points - 0.5) * scale).astype(np.int32)
        cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)
    return mask


def _detect_format(segmentation: Any) -> str:
    if isinstance(segmentation, dict):
        if isinstance(segmentation.get("counts"), str | bytes):
            return "coco"
        return "legacy"
    if isinstance(segmentation, list):
        return "polygon"
    raise ValueError(f"Unrecognised segmentation of type {type(segmentation).__name__}")


def segmentation_to_mask(segmentation: Any, image_hw: Sequence[int] | None = None, fmt: str = "auto") -> np.ndarray:
    """Decode one annotation's ``segmentation`` in any of the server's formats to an (H, W) uint8 mask.

    ``fmt="auto"`` reads str/bytes counts as COCO, int-list counts as **legacy** (row-major, the server's default
    format) and lists of rings as polygons. Pass ``fmt="coco"`` for column-major uncompressed COCO counts: the two
    uncompressed forms cannot be told apart from the data. ``image_hw`` is required for polygons and, when given,
    must match an RLE's ``size``.
    """
    if fmt not in MASK_FORMATS:
        raise ValueError(f"fmt must be one of {MASK_FORMATS}, not {fmt!r}")
    kind = _detect_format(segmentation) if fmt == "auto" else fmt
    if kind == "polygon":
        if image_hw is None:
            raise ValueError("Decoding polygons needs image_hw (H, W)")
        return decode_polygons(segmentation, image_hw)
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"A {kind} segmentation must be a dict with 'counts' and 'size'")
    if image_hw is not None and [int(v) for v in segmentation["size"]] != [int(v) for v in image_hw]:
        raise ValueError(f"segmentation size {segmentation['size']} does not match the image (H, W) {list(image_hw)}")
    if kind == "legacy":
        return decode_legacy_rle(segmentation["counts"], segmentation["size"])
    return decode_coco_rle(segmentation)


def annotations_to_masks(
    annotations: Sequence[dict], image_hw: Sequence[int] | None = None, fmt: str = "auto"
) -> np.ndarray:
    """(N, H, W) uint8 masks of a response's ``annotations`` (every one must have a ``segmentation``).

    ``image_hw`` is needed for polygons and for N == 0; otherwise it is read from the RLE ``size``.
    """
    if image_hw is None:
        sizes = [a["segmentation"]["size"] for a in annotations if isinstance(a.get("segmentation"), dict)]
        if not sizes:
            raise ValueError("image_hw is needed: no annotation carries an RLE size")
        image_hw = sizes[0]
    height, width = (int(v) for v in image_hw)
    masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
    for i, annotation in enumerate(annotations):
        if "segmentation" not in annotation:
            raise ValueError(f"annotation {i} has no segmentation (format=boxes?)")
        masks[i] = segmentation_to_mask(annotation["segmentation"], (height, width), fmt)
    return masks


# ---------------------------------------------------------------------------------------------------- drawing


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, well separated BGR colour for a class id: the same class has the same colour in every image."""
    hue = (int(class_id) * 0.618033988749895) % 1.0  # golden-ratio steps spread consecutive ids around the wheel
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _crop_to_mask(mask: np.ndarray) -> MaskPatch:
    """A full-size mask as the smallest patch that holds its ones (cheap to blend and outline)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return 0, 0, mask[:0, :0]
    return int(rows[0]), int(cols[0]), mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _blend_mask(canvas: np.ndarray, patch: MaskPatch, color: tuple[int, int, int], alpha: float) -> None:
    y0, x0, mask = patch
    if mask.size == 0:
        return
    region = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    inside = mask.astype(bool)
    region[inside] = (region[inside] * (1.0 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    cv2.drawContours(canvas, contours, -1, color, 1, cv2.LINE_AA)


def _draw_label(canvas: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    """``text`` on a filled box of ``color`` just above (x, y), or just below it at the image top."""
    thickness = max(1, round(scale * 2))
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    height, width = canvas.shape[:2]
    x = min(max(x, 0), max(width - tw - 2, 0))
    top = y - th - baseline - 2
    if top < 0:
        top = min(max(y, 0), max(height - th - baseline - 2, 0))
    cv2.rectangle(canvas, (x, top), (x + tw + 2, top + th + baseline + 2), color, cv2.FILLED)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA)


def draw_instances(
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    class_ids: Sequence[int],
    names: Sequence[str],
    scores: Sequence[float] | None = None,
    masks: Iterable[MaskPatch | np.ndarray | None] | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Draw instances on a copy of a BGR uint8 image and return it.

    Args:
        image: (H, W, 3) BGR uint8 (a grayscale (H, W) image is converted).
        boxes_xyxy: (N, 4) float x1, y1, x2, y2 in the image's pixels.
        class_ids: N class ids; they choose the colour (:func:`class_color`).
        names: N class names for the labels.
        scores: N scores shown next to the names, or None.
        masks: per instance a full (H, W) mask, a ``(y0, x0, patch)`` tuple, or None; or None for no masks.
        alpha: opacity of the mask fill.
    """
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    count = len(boxes)
    if len(class_ids) != count or len(names) != count or (scores is not None and len(scores) != count):
        raise ValueError("boxes, class_ids, names and scores must have one entry per instance")
    colors = [class_color(k) for k in class_ids]
    # Lowest score first, so the most confident instance ends up on top.
    if masks is not None:
        patches = [m if (m is None or isinstance(m, tuple)) else _crop_to_mask(np.asarray(m)) for m in masks]
        if len(patches) != count:
            raise ValueError(f"got {len(patches)} masks for {count} instances")
        for i in reversed(range(count)):
            if patches[i] is not None:
                _blend_mask(canvas, patches[i], colors[i], alpha)
    scale = float(np.clip(min(canvas.shape[:2]) / 900.0, 0.35, 1.2))
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    for i in reversed(range(count)):
        x1, y1, x2, y2 = boxes[i]
        p1 = (int(round(x1)), int(round(y1)))
        p2 = (max(int(round(x2)) - 1, p1[0]), max(int(round(y2)) - 1, p1[1]))  # last pixel inside the box
        cv2.rectangle(canvas, p1, p2, colors[i], thickness, cv2.LINE_AA)
        label = names[i] if scores is None else f"{names[i]} {float(scores[i]):.2f}"
        _draw_label(canvas, label, p1[0], p1[1], colors[i], scale)
    return canvas


def draw_detections(image: np.ndarray, detections: Detections, mask_threshold: float = 0.5, **style) -> np.ndarray:
    """Draw a backend's :class:`Detections` (masks pasted per box, never N full-size masks at once)."""
    patches: Iterator[MaskPatch] | None = (
        ((mask.y0, mask.x0, mask.patch()) for mask in instance_masks(detections, mask_threshold))
        if detections.has_masks else None
    )
    return draw_instances(
        image, detections.boxes, detections.labels, detections.names, detections.scores, patches, **style
    )


def draw_annotations(image: np.ndarray, annotations: Sequence[dict], fmt: str = "auto", **style) -> np.ndarray:
    """Draw a response's ``annotations`` (any ``format``; see :func:`segmentation_to_mask` for ``fmt``).

    Uses ``bbox`` [x, y, w, h], ``category_id``, ``category_name`` (else the id) and ``score`` when present.
    """
    hw = image.shape[:2]
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    class_ids = [int(a.get("category_id", 0)) for a in annotations]
    names = [str(a.get("category_name", a.get("category_id", "?"))) for a in annotations]
    scores = [a["score"] for a in annotations] if all("score" in a for a in annotations) else None
    has_masks = bool(annotations) and all("segmentation" in a for a in annotations)
    masks = (
        [_crop_to_mask(segmentation_to_mask(a["segmentation"], hw, fmt)) for a in annotations] if has_masks else None
    )
    return draw_instances(image, boxes, class_ids, names, scores, masks, **style)


def plot_annotations(
    image: np.ndarray,
    annotations: Sequence[dict] = (),
    fmt: str = "auto",
    ax: Any = None,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 8.0),
    **style,
) -> Any:
    """Show a BGR image with its annotations in a matplotlib Axes (for notebooks); returns the Axes.

    matplotlib is imported here, on first use: install the ``notebook`` extra (``pip install
    'maskrcnn-serving[notebook]'``) to use this function.
    """
    import matplotlib.pyplot as plt

    drawn = draw_annotations(image, annotations, fmt, **style) if annotations else image
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.imshow(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB))
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return ax


# ------------------------------------------------------------------------------------------------ instance search


def instance_crop(image: np.ndarray, bbox_xywh: Sequence[float], mask: np.ndarray | None = None,
                  class_id: int = 0, size: int = 128) -> np.ndarray:
    """The box of one instance (10 % margin), its mask blended in its class colour, scaled to fit ``size`` x
    ``size`` and centred on a grey square. ``mask`` is the full-image (H, W) mask or None."""
    height, width = image.shape[:2]
    x, y, w, h = (float(v) for v in bbox_xywh)
    margin = 0.1 * max(w, h, 1.0)
    x0, y0 = max(0, int(x - margin)), max(0, int(y - margin))
    x1, y1 = min(width, int(np.ceil(x + w + margin))), min(height, int(np.ceil(y + h + margin)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = image[y0:y1, x0:x1].copy()
    if mask is not None:
        _blend_mask(crop, (0, 0, np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8)), class_color(class_id), 0.45)
    scale = size / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tile = np.full((size, size, 3), 64, np.uint8)
    top, left = (size - crop.shape[0]) // 2, (size - crop.shape[1]) // 2
    tile[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return tile


def neighbour_strip(query: np.ndarray, neighbours: Sequence[np.ndarray], captions: Sequence[str],
                    query_caption: str = "query") -> np.ndarray:
    """One row of equal square tiles: the query instance, a gap, then its neighbours, each with a caption."""
    size = query.shape[0]
    caption_height = 18
    tiles = [query, np.full((size, size // 4, 3), 255, np.uint8), *neighbours]
    texts = [query_caption, "", *captions]
    columns = []
    for tile, text in zip(tiles, texts, strict=True):
        column = np.full((size + caption_height, tile.shape[1], 3), 255, np.uint8)
        column[:size] = tile
        if text:
            cv2.putText(column, text[: max(1, tile.shape[1] // 7)], (2, size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1, cv2.LINE_AA)
        columns.append(column)
    return np.hstack(columns)


def project_2d(vectors: np.ndarray) -> np.ndarray:
    """(N, 2) coordinates of (N, D) vectors on their first two principal components (PCA by SVD, centred)."""
    vectors = np.asarray(vectors, np.float64)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2))
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    return projected if projected.shape[1] == 2 else np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))


def draw_embedding_map(
    vectors: np.ndarray,
    thumbnails: Sequence[np.ndarray],
    class_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
    size: int = 1000,
    thumbnail_size: int = 40,
) -> np.ndarray:
    """A 2-D PCA map of instance embeddings: each instance's thumbnail (BGR) at its projected position, framed in
    its class colour (the colours of :func:`class_color`), with a legend. Returns a (size, size, 3) BGR image."""
    canvas = np.full((size, size, 3), 255, np.uint8)
    points = project_2d(vectors)
    if len(points) == 0:
        return canvas
    border = thumbnail_size // 2 + 4
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    positions = border + (points - low) / span * (size - 2 * border)
    half = thumbnail_size // 2
    for (x, y), thumbnail, class_id in zip(positions.astype(int), thumbnails, class_ids, strict=True):
        scale = thumbnail_size / max(thumbnail.shape[:2])
        new_wh = (max(1, round(thumbnail.shape[1] * scale)), max(1, round(thumbnail.shape[0] * scale)))
        small = cv2.resize(thumbnail, new_wh, interpolation=cv2.INTER_AREA)
        top, left = y - small.shape[0] // 2, x - small.shape[1] // 2
        canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
        cv2.rectangle(canvas, (x - half - 1, y - half - 1), (x + half, y + half), class_color(class_id), 2)
    if class_names is not None:
        for row, class_id in enumerate(sorted(set(int(k) for k in class_ids))):
            cv2.rectangle(canvas, (8, 8 + 18 * row), (20, 20 + 18 * row), class_color(class_id), cv2.FILLED)
            cv2.putText(canvas, str(class_names[class_id]), (26, 19 + 18 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return canvas
