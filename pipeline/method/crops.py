"""Batched crop cutting and resizing on the model's device.

All crops of all images in a batch are cut as ``torchvision.ops.roi_align`` cuts them
(``aligned=True``, adaptive sampling ratio) from one padded tensor (or, in a batch of very
different shapes, one per group of like-sized images, so that padding never multiplies the
batch's memory): bilinear sampling with an adaptive number of samples per output pixel, which
averages (anti-aliases) when a crop is larger than the model input.

On a GPU, torchvision's kernel does it. On the CPU its kernel runs on one thread (about 3 ms
per 224-px crop), so :func:`separable_crops` computes the same sampling as two sparse matrix
products per few crops (roi_align's weights are a product of a row weight and a column weight):
2.6x as fast on two cores, equal to torchvision's crops within 1e-4 of a grey level
(tests/method/test_crops.py).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pipeline.config import ConfigError

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


PAD_LIMIT = 2.0  # a padded group may hold at most this many times its images' own pixels
CPU_CROPS_PER_PRODUCT = 8  # crops per pair of sparse products: the buffers stay in the CPU's caches


@dataclass
class PixelBatch:
    """Decoded images of one batch on the device, padded into groups of like-sized images.

    ``groups``: float32 ``[G_g, 3, H_g, W_g]`` tensors in 0..255, one per group, each image
    padded to its group's size by replicating its edge (so sampling near a border equals
    clamping to that image). Usually the whole batch is one group; see :func:`pad_groups`.
    On the CPU each group's memory is ordered ``[G_g, W_g, H_g, 3]`` (:func:`separable_crops`).
    ``group``, ``slot``: long ``[B]``, each image's group and its place in that group.
    ``scale``: ``[B, 2]`` as ``(sy, sx)``, working-copy pixels per original pixel.
    """

    groups: list[torch.Tensor]
    group: torch.Tensor
    slot: torch.Tensor
    scale: torch.Tensor


def pad_groups(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Image indices grouped so that padding each group to its largest height and width costs
    at most ``PAD_LIMIT`` times the group's own pixels: in batch order, each image joins the
    first group it fits. Photos of both orientations share one group; a wide panorama and a
    tall one do not (padded together, each would become a large square)."""
    groups: list[list[int]] = []
    sizes: list[tuple[int, int, int]] = []  # per group: largest height, largest width, own pixels
    for i, (h, w) in enumerate(shapes):
        for g, (max_h, max_w, pixels) in enumerate(sizes):
            joined = (max(max_h, h), max(max_w, w), pixels + h * w)
            if joined[0] * joined[1] * (len(groups[g]) + 1) <= PAD_LIMIT * joined[2]:
                groups[g].append(i)
                sizes[g] = joined
                break
        else:
            groups.append([i])
            sizes.append((h, w, h * w))
    return groups


def pad_batch(images: list[np.ndarray], sizes: list[tuple[int, int]], device: torch.device) -> PixelBatch:
    """Move uint8 ``[h, w, 3]`` working copies to ``device``, padded in groups (:func:`pad_groups`).

    ``sizes`` are the original ``(H, W)`` of each image; the working copy may be a
    downscaled copy of it, and boxes given in original coordinates are rescaled.
    """
    groups = pad_groups([image.shape[:2] for image in images])
    tensors, group, slot = [], [0] * len(images), [0] * len(images)
    for g, members in enumerate(groups):
        max_h = max(images[i].shape[0] for i in members)
        max_w = max(images[i].shape[1] for i in members)
        padded = []
        for place, i in enumerate(members):
            group[i], slot[i] = g, place
            chw = torch.from_numpy(np.require(images[i], np.uint8, ["C", "W"])).to(device).permute(2, 0, 1).float()
            pad = (0, max_w - chw.shape[2], 0, max_h - chw.shape[1])
            padded.append(F.pad(chw[None], pad, mode="replicate")[0] if any(pad) else chw)
        stacked = torch.stack(padded)
        # on the CPU, in the memory order separable_crops reads: [G, W, H, 3]
        tensors.append(stacked.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1) if device.type == "cpu"
                       else stacked)
    scale = torch.tensor(
        [[image.shape[0] / h, image.shape[1] / w] for image, (h, w) in zip(images, sizes)],
        dtype=torch.float32, device=device)
    return PixelBatch(groups=tensors, group=torch.tensor(group, device=device),
                      slot=torch.tensor(slot, device=device), scale=scale)


def cut_crops(batch: PixelBatch, image_index: torch.Tensor, boxes: torch.Tensor,
              preprocess: Preprocess, dtype: torch.dtype) -> torch.Tensor:
    """Cut, resize and normalise crops, ready for ``encode_image``.

    ``image_index``: long ``[M]``, the image each box belongs to; ``boxes``: ``[M, 4]``
    in original-image coordinates. Returns ``[M, 3, S, S]`` in ``dtype``, normalised
    with the model's mean and std.
    """
    device = batch.scale.device
    index = image_index.to(device)
    scaled = boxes.to(device, torch.float32) * batch.scale[index][:, [1, 0, 1, 0]]
    rois = torch.cat([batch.slot[index, None].float(), scaled], dim=1)
    size = preprocess.image_size
    if len(batch.groups) == 1:
        crops = _roi_align(batch.groups[0], rois, size)
    else:  # images of very different shapes in the batch: one call per group
        member = batch.group[index]
        crops = rois.new_empty(len(rois), 3, size, size)
        for g, pixels in enumerate(batch.groups):
            rows = (member == g).nonzero()[:, 0]
            if len(rows):
                crops[rows] = _roi_align(pixels, rois[rows], size)
    mean, std = _normaliser(preprocess.mean, preprocess.std, crops.device)
    return crops.sub_(mean).div_(std).to(dtype)  # in place: the crops are this call's own tensor


def _roi_align(pixels: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """``[M, 3, size, size]`` bilinear crops of ``pixels`` ``[G, 3, H, W]`` at ``rois``
    ``[M, 5]`` (slot, x1, y1, x2, y2), averaging where a crop is larger than the output:
    torchvision's kernel on a GPU, :func:`separable_crops` on the CPU."""
    if pixels.device.type == "cpu":
        return torch.cat([separable_crops(pixels, part, size)
                          for part in rois.split(CPU_CROPS_PER_PRODUCT)]) if len(rois) else \
            pixels.new_zeros(0, 3, size, size)
    return roi_align(pixels, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def axis_samples(start: torch.Tensor, end: torch.Tensor, size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """roi_align's sampling along one axis of length ``limit`` for crops from ``start`` to ``end``
    ``[M]`` (``aligned=True``: pixel centres at +0.5), ``size`` outputs each: the pixels read
    (long ``[M, size, 2g]``) and their weights (``[M, size, 2g]``, each output's summing to 1).

    As torchvision computes it: ``g = ceil(length / size)`` samples per output, at
    ``start - 0.5 + p * bin + (i + 0.5) * bin / g``; a sample below -1 or past ``limit`` weighs
    nothing, one below 0 reads pixel 0, one past the last pixel reads the last pixel; each
    sample is split between its two neighbouring pixels linearly. Crops with fewer samples
    than the batch's largest ``g`` pad with zero weights.
    """
    start, end = start - 0.5, end - 0.5
    length = end - start
    bin_size = (length / size)[:, None, None]
    count = torch.ceil(length / size)[:, None, None]  # float, as torchvision's ceil
    samples = max(int(count.max()), 1)
    index = torch.arange(samples, dtype=torch.float32)[None, None, :]
    position = (start[:, None, None] + torch.arange(size, dtype=torch.float32)[None, :, None] * bin_size
                + (index + 0.5) * bin_size / count.clamp(min=1))
    weight = ((position >= -1) & (position <= limit) & (index < count)) / count.clamp(min=1)
    position = position.clamp(min=0)
    low = position.long().clamp(0, limit - 1)  # clamped: a NaN corner reads pixel 0, never memory outside
    edge = low == limit - 1
    high = torch.where(edge, low, low + 1)
    fraction = torch.where(edge, 0.0, position - low)
    shape = (len(start), size, 2 * samples)
    return (torch.stack([low, high], -1).view(shape),
            (torch.stack([1 - fraction, fraction], -1) * weight[..., None]).view(shape))


def sampling_matrix(pixels: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, columns: int) -> torch.Tensor:
    """A sparse ``[M * size, columns]`` matrix whose row ``(m, p)`` holds ``weights[m, p]`` at
    columns ``offsets[m] + pixels[m, p]`` (a pixel read twice is summed once)."""
    count, size, taps = pixels.shape
    rows = torch.arange(count * size).repeat_interleave(taps)
    cols = (pixels + offsets[:, None, None]).reshape(-1)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), weights.reshape(-1), (count * size, columns),
                                     check_invariants=False)  # in range by construction
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return matrix.coalesce().to_sparse_csr()


def separable_crops(pixels: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """roi_align's crops (see :func:`_roi_align`) as two sparse products on the CPU.

    The weight of pixel ``(y, x)`` in output ``(p, q)`` is ``a_p(y) * b_q(x)`` (:func:`axis_samples`),
    so a crop is ``A @ image @ B^T``: first every crop's columns from the images laid out as
    ``[G * W, H * 3]`` (:func:`pad_batch` keeps CPU groups in that memory order), then their rows.
    Returns ``[M, 3, size, size]`` in channels-last memory order.
    """
    groups, _, height, width = pixels.shape
    columns_first = pixels.permute(0, 3, 2, 1).reshape(groups * width, height * 3)  # a view when laid out so
    count = len(rois)
    slot = rois[:, 0].long()
    x_pixels, x_weights = axis_samples(rois[:, 1], rois[:, 3], size, width)
    y_pixels, y_weights = axis_samples(rois[:, 2], rois[:, 4], size, height)
    cols = torch.sparse.mm(sampling_matrix(x_pixels, x_weights, slot * width, groups * width), columns_first)
    rows_first = cols.view(count, size, height, 3).transpose(1, 2).reshape(count * height, size * 3)
    crops = torch.sparse.mm(sampling_matrix(y_pixels, y_weights, torch.arange(count) * height, count * height),
                            rows_first)
    return crops.view(count, size, size, 3).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _normaliser(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The model's mean and std on 0..255 pixels as ``[1, 3, 1, 1]`` tensors on ``device``, made
    once: a copy to the GPU in every encoder pass would wait for the GPU's queued work."""
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) * 255.0 for values in (mean, std))
