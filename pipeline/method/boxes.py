"""Crop-box geometry of METHOD.md: seeded sampling, the full view and expansion.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates of the original image (after
EXIF orientation), as floats. All boxes are squares except a 'squash' full view.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def box_generator(seed: int, image_id: str) -> np.random.Generator:
    """A random generator that depends only on ``(seed, image_id)``.

    The same image therefore gets the same boxes in any batch, on any worker and in
    any process (no dependence on Python's salted ``hash``).
    """
    digest = hashlib.blake2b(f"{seed}\x1f{image_id}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def sample_boxes(seed: int, image_id: str, height: int, width: int,
                 count: int, alpha: float, beta: float) -> np.ndarray:
    """Sample ``count`` square boxes for one image.

    Side ``s_i = U(alpha, beta) * min(H, W)``; the top-left corner is uniform over the
    positions that keep the box inside the image. Returns float64 ``[count, 4]``.
    """
    rng = box_generator(seed, image_id)
    sides = rng.uniform(alpha, beta, size=count) * min(height, width)
    x0 = rng.uniform(0.0, 1.0, size=count) * (width - sides)
    y0 = rng.uniform(0.0, 1.0, size=count) * (height - sides)
    return np.stack([x0, y0, x0 + sides, y0 + sides], axis=1)


def full_view_box(height: int, width: int, resize_mode: str) -> np.ndarray:
    """The region the model's own preprocessing shows it, as a box ``[4]``.

    ``shortest`` (resize the short side, centre crop) is the centred square of side
    ``min(H, W)``; ``squash`` is the whole image resized to a square.
    """
    if resize_mode == "squash":
        return np.array([0.0, 0.0, float(width), float(height)])
    if resize_mode != "shortest":
        raise ValueError(f"resize_mode {resize_mode!r} is not supported; use 'shortest' or 'squash'")
    side = float(min(height, width))
    x0, y0 = (width - side) / 2.0, (height - side) / 2.0
    return np.array([x0, y0, x0 + side, y0 + side])


def expand_boxes(boxes: torch.Tensor, ratio: float, sizes: torch.Tensor) -> torch.Tensor:
    """Expand square boxes about their centres by ``ratio`` in side length.

    ``boxes``: ``[B, K, 4]``; ``sizes``: ``[B, 2]`` as ``(H, W)`` of each image.
    The new side is capped at ``min(H, W)`` and the box is shifted to stay inside the
    image. Returns ``[B, K, 4]``.
    """
    height = sizes[:, 0:1].to(boxes.dtype)
    width = sizes[:, 1:2].to(boxes.dtype)
    side = torch.minimum((boxes[..., 2] - boxes[..., 0]) * ratio, torch.minimum(height, width))
    cx = (boxes[..., 0] + boxes[..., 2]) / 2.0
    cy = (boxes[..., 1] + boxes[..., 3]) / 2.0
    x0 = torch.minimum(torch.clamp(cx - side / 2.0, min=0.0), width - side)
    y0 = torch.minimum(torch.clamp(cy - side / 2.0, min=0.0), height - side)
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=-1)
