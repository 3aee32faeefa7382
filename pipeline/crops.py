"""Batched crop cutting and resizing on the model's device.

All crops of all images in a batch are cut with ``torchvision.ops.roi_align`` from one
padded tensor: bilinear sampling with an adaptive number of samples per output pixel,
which averages (anti-aliases) when a crop is larger than the model input.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .config import ConfigError

RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for the model, as the loaded model states it."""

    image_size: int  # square model input side (pixels)
    mean: tuple[float, float, float]  # per-channel RGB mean, on pixel values scaled to [0, 1]
    std: tuple[float, float, float]  # per-channel RGB standard deviation, same scale
    interpolation: str = "bicubic"  # the model's resize filter; crops here use roi_align
    resize_mode: str = "shortest"  # 'shortest' (short side to size, centre crop) or 'squash'

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ConfigError(f"preprocess: image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"preprocess: mean and std need 3 (RGB) values, got {self.mean} and {self.std}")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"preprocess: std values must be positive, got {self.std}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"preprocess: resize_mode {self.resize_mode!r} is not supported; "
                f"available: {', '.join(RESIZE_MODES)}")


@dataclass
class PixelBatch:
    """Decoded images of one batch, padded into one tensor on the device.

    ``pixels``: float32 ``[B, 3, Hmax, Wmax]`` in 0..255, each image padded by
    replicating its edge (so sampling near a border equals clamping to that image).
    ``scale``: ``[B, 2]`` as ``(sy, sx)``, working-copy pixels per original pixel.
    """

    pixels: torch.Tensor
    scale: torch.Tensor


def pad_batch(images: list[np.ndarray], sizes: list[tuple[int, int]], device: torch.device) -> PixelBatch:
    """Move uint8 ``[h, w, 3]`` working copies to ``device`` and pad them to one tensor.

    ``sizes`` are the original ``(H, W)`` of each image; the working copy may be a
    downscaled copy of it, and boxes given in original coordinates are rescaled.
    """
    max_h = max(image.shape[0] for image in images)
    max_w = max(image.shape[1] for image in images)
    padded = []
    for image in images:
        chw = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).to(device).permute(2, 0, 1).float()
        pad = (0, max_w - chw.shape[2], 0, max_h - chw.shape[1])
        padded.append(F.pad(chw[None], pad, mode="replicate")[0] if any(pad) else chw)
    scale = torch.tensor(
        [[image.shape[0] / h, image.shape[1] / w] for image, (h, w) in zip(images, sizes)],
        dtype=torch.float32, device=device)
    return PixelBatch(pixels=torch.stack(padded), scale=scale)


def cut_crops(batch: PixelBatch, image_index: torch.Tensor, boxes: torch.Tensor,
              preprocess: Preprocess, dtype: torch.dtype) -> torch.Tensor:
    """Cut, resize and normalise crops, ready for ``encode_image``.

    ``image_index``: long ``[M]``, the image each box belongs to; ``boxes``: ``[M, 4]``
    in original-image coordinates. Returns ``[M, 3, S, S]`` in ``dtype``, normalised
    with the model's mean and std.
    """
    index = image_index.to(batch.pixels.device)
    scale = batch.scale[index]
    scaled = boxes.to(batch.pixels.device, torch.float32) * scale[:, [1, 0, 1, 0]]
    rois = torch.cat([index[:, None].float(), scaled], dim=1)
    size = preprocess.image_size
    crops = roi_align(batch.pixels, rois, output_size=(size, size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
    mean, std = _normaliser(preprocess.mean, preprocess.std, crops.device)
    return ((crops - mean) / std).to(dtype)


@functools.lru_cache(maxsize=16)
def _normaliser(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The model's mean and std on 0..255 pixels as ``[1, 3, 1, 1]`` tensors on ``device``, made
    once: a copy to the GPU in every encoder pass would wait for the GPU's queued work."""
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) * 255.0 for values in (mean, std))
