"""Box geometry: sampling ranges, determinism per (seed, id), the full view, expansion."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.method.boxes import expand_boxes, full_view_box, sample_boxes


@pytest.mark.parametrize("height,width", [(480, 640), (640, 480), (100, 100), (37, 1000)])
def test_sampled_boxes_are_squares_inside_the_image_with_sides_in_range(height, width):
    boxes = sample_boxes(0, "s3://bucket/cat.jpg", height, width, 500, 0.5, 0.9)
    short = min(height, width)
    sides = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], sides)
    assert sides.min() >= 0.5 * short and sides.max() <= 0.9 * short
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height
    # uniform sides and positions: they spread over the whole allowed range
    assert sides.min() < 0.55 * short and sides.max() > 0.85 * short
    assert np.ptp(boxes[:, 0] / np.maximum(width - sides, 1e-9)) > 0.9


def test_boxes_depend_only_on_seed_and_image_id():
    first = sample_boxes(3, "img-1", 300, 400, 60, 0.5, 0.9)
    np.testing.assert_array_equal(first, sample_boxes(3, "img-1", 300, 400, 60, 0.5, 0.9))
    assert not np.allclose(first, sample_boxes(4, "img-1", 300, 400, 60, 0.5, 0.9))
    assert not np.allclose(first, sample_boxes(3, "img-2", 300, 400, 60, 0.5, 0.9))


def test_boxes_are_the_same_in_another_process():
    code = ("from pipeline.method.boxes import sample_boxes; "
            "print(repr(sample_boxes(9, 'tar://x#0001.jpg', 200, 300, 3, 0.5, 0.9).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert eval(out.stdout) == sample_boxes(9, "tar://x#0001.jpg", 200, 300, 3, 0.5, 0.9).tolist()


def test_full_view_is_the_centred_square_or_the_whole_image():
    np.testing.assert_allclose(full_view_box(300, 500, "shortest"), [100, 0, 400, 300])
    np.testing.assert_allclose(full_view_box(500, 300, "shortest"), [0, 100, 300, 400])
    np.testing.assert_allclose(full_view_box(300, 500, "squash"), [0, 0, 500, 300])
    with pytest.raises(ValueError, match="longest"):
        full_view_box(300, 500, "longest")


def test_expansion_grows_about_the_centre():
    boxes = torch.tensor([[[100.0, 100.0, 140.0, 140.0]]], dtype=torch.float64)
    grown = expand_boxes(boxes, 1.25, torch.tensor([[400, 600]]))
    np.testing.assert_allclose(grown[0, 0].numpy(), [95.0, 95.0, 145.0, 145.0])


def test_expansion_is_shifted_back_inside_at_borders():
    sizes = torch.tensor([[200, 300]])  # H=200, W=300
    boxes = torch.tensor([[[0.0, 0.0, 80.0, 80.0],      # top-left corner
                           [230.0, 130.0, 300.0, 200.0]]], dtype=torch.float64)  # bottom-right
    grown = expand_boxes(boxes, 1.5, sizes)[0].numpy()
    np.testing.assert_allclose(grown[0], [0.0, 0.0, 120.0, 120.0])
    np.testing.assert_allclose(grown[1], [195.0, 95.0, 300.0, 200.0])


def test_expansion_is_capped_at_the_short_side():
    sizes = torch.tensor([[200, 300]])
    boxes = torch.tensor([[[120.0, 10.0, 290.0, 180.0]]], dtype=torch.float64)  # side 170
    grown = expand_boxes(boxes, 1.5, sizes)[0, 0].numpy()
    assert grown[2] - grown[0] == pytest.approx(200.0) and grown[3] - grown[1] == pytest.approx(200.0)
    np.testing.assert_allclose(grown, [100.0, 0.0, 300.0, 200.0])  # centre x 205 shifted left
    # repeated expansion of a capped box stays the short-side square
    again = expand_boxes(torch.tensor(grown)[None, None], 1.5, sizes)[0, 0].numpy()
    np.testing.assert_allclose(again, grown)
