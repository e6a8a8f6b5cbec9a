"""FPN anchors (docs/model-conventions.md#anchors)."""

import math

import numpy as np

from maskrcnn_serving.modeling.anchors import cell_anchors, fpn_anchors, grid_anchors


# --- anchors ------------------------------------------------------------------------------------------------------
def test_cell_anchors_ratio_is_height_over_width():
    cells = cell_anchors(32, (0.5, 1.0, 2.0))
    w = math.sqrt(32 * 32 / 0.5)
    np.testing.assert_allclose(cells[0], [-w / 2, -w / 4, w / 2, w / 4])  # r = 0.5 is a wide box
    np.testing.assert_allclose(cells[1], [-16, -16, 16, 16])
    np.testing.assert_allclose(cells[2], [-w / 4, -w / 2, w / 4, w / 2])


def test_grid_anchors_are_centred_on_j_stride_i_stride():
    anchors = grid_anchors(4, 32, (0.5, 1.0, 2.0), 3, 5)
    assert anchors.shape == (3, 5, 3, 4) and anchors.dtype == np.float32
    np.testing.assert_allclose(anchors[0, 0, 1], [-16, -16, 16, 16])
    np.testing.assert_allclose(anchors[1, 2, 1], [8 - 16, 4 - 16, 8 + 16, 4 + 16])  # row i=1 (y), column j=2 (x)


def test_fpn_anchor_fields_follow_max_size():
    levels = fpn_anchors((4, 8, 16, 32, 64), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), 1344.0)
    assert [a.shape[0] for a in levels] == [336, 168, 84, 42, 21]
