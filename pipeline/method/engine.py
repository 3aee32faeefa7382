"""The scoring engine: clip, cupl, wca and lgca scores of a batch of images in one pass.

Pure torch, no Ray and no open_clip: the model is any object with ``encode_image`` and
``encode_text``. Formulas and defaults are those of METHOD.md; LGCA's expansion steps
are the reconstructed rule documented in docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ScoringParams
from pipeline.method.boxes import expand_boxes, full_view_box, sample_boxes
from pipeline.method.crops import PixelBatch, Preprocess, cut_crops, pad_batch
from pipeline.method.textbank import TextBank, build_text_bank

# Crops per encoder pass when encode_batch_size is 0. On a CPU, passes of 256 crops spend
# about 12 % of their time in page faults (tensors over glibc's 32 MB mmap threshold are
# mapped and unmapped at every op) and 32-crop passes none: 9-14 % faster for ViT-B-32 on
# 2 cores (docs/benchmarks.md). A GPU wants large passes.
AUTO_ENCODE_BATCH_CPU, AUTO_ENCODE_BATCH_GPU = 32, 256


def encode_chunk(params: ScoringParams, device: torch.device) -> int:
    """Crops per image-encoder pass: ``params.encode_batch_size``, or the device's default if 0."""
    return params.encode_batch_size or (AUTO_ENCODE_BATCH_CPU if device.type == "cpu" else AUTO_ENCODE_BATCH_GPU)


class ClipLike(Protocol):
    """The two methods of an open_clip model the engine uses."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ImageInput:
    """One decoded image: a uint8 ``[h, w, 3]`` working copy and its original size."""

    image_id: str
    pixels: np.ndarray
    height: int  # original height H (boxes are in original coordinates)
    width: int  # original width W


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of B images over C classes (float32, on the CPU).

    ``clip``, ``cupl``: ``[B, C]``. For wca and lgca runs also ``wca`` ``[B, C]``
    (= ``steps[0]``), ``boxes`` ``[T+1, B, N, 4]`` (the N boxes at each step, original
    pixel coordinates) and ``weights`` ``[T+1, B, N]`` (``w^t``). For lgca runs also
    ``steps`` ``[T+1, B, C]`` (``S_t``), ``expanded`` ``[T, B, K]`` (indices of the
    boxes expanded at steps 1..T) and ``lgca`` ``[B, C]``.
    """

    clip: torch.Tensor
    cupl: torch.Tensor
    wca: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    lgca: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    expanded: torch.Tensor | None = None

    def method(self, name: str) -> torch.Tensor:
        """The ``[B, C]`` scores of method ``name``."""
        scores = getattr(self, name)
        if scores is None:
            raise ValueError(f"method {name!r} was not computed in this run")
        return scores

    def expanded_boxes(self, step: int) -> torch.Tensor:
        """``[B, K, 4]``: the boxes as expanded at ``step`` (1..T)."""
        index = self.expanded[step - 1]
        return self.boxes[step].gather(1, index[..., None].expand(-1, -1, 4))


class Engine:
    """Scores images against a fixed set of classes.

    Built once per model holder (an actor): the text bank is encoded in
    ``__init__``; :meth:`score` only encodes images.
    """

    def __init__(self, model: ClipLike, tokenizer: Callable[[list[str]], torch.Tensor],
                 names: Sequence[str], prompts: Sequence[Sequence[str]],
                 descriptions: Sequence[Sequence[str]], params: ScoringParams,
                 preprocess: Preprocess, device: torch.device, dtype: torch.dtype = torch.float32,
                 text_batch_size: int = 256):
        self.model = model
        self.params = params
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.bank: TextBank = build_text_bank(
            model, tokenizer, names, prompts, descriptions, params.lambda_t, text_batch_size, device)

    @classmethod
    def for_classes(cls, loaded, classes, params: ScoringParams) -> Engine:
        """An engine for a loaded model (:class:`pipeline.model.loading.LoadedModel`) and a
        :class:`pipeline.model.classes.ClassSet` (both duck-typed: no open_clip import here)."""
        return cls(loaded.model, loaded.tokenizer, classes.names,
                   [classes.prompts(i) for i in range(len(classes.names))], classes.descriptions,
                   params, loaded.preprocess, loaded.device, loaded.dtype)

    def score(self, images: Sequence[ImageInput]) -> BatchScores:
        """Score a batch; see :class:`BatchScores` for what is returned."""
        params = self.params
        with torch.inference_mode():
            pixels = pad_batch([im.pixels for im in images], [(im.height, im.width) for im in images],
                               self.device)
            views = torch.tensor(np.stack([full_view_box(im.height, im.width, self.preprocess.resize_mode)
                                           for im in images]), device=self.device)[:, None]
            if params.needs_crops:  # the full view and the N crops in one encoder pass
                boxes = torch.tensor(np.stack([
                    sample_boxes(params.seed, im.image_id, im.height, im.width,
                                 params.crops, params.alpha, params.beta) for im in images]),
                    device=self.device)
                views = torch.cat([views, boxes], dim=1)
            embedded = self._encode(pixels, views)
            k0 = embedded[:, 0]
            clip, cupl = k0 @ self.bank.anchors.T, k0 @ self.bank.cupl.T
            if not params.needs_crops:
                return BatchScores(clip=clip.cpu(), cupl=cupl.cpu())
            sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)
            return self._crop_steps(pixels, k0, views[:, 1:], embedded[:, 1:], sizes, clip, cupl)

    def _crop_steps(self, pixels: PixelBatch, k0: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
                    sizes: torch.Tensor, clip: torch.Tensor, cupl: torch.Tensor) -> BatchScores:
        """WCA on the sampled boxes (step 0), then LGCA's expansion steps 1..T."""
        params = self.params
        weights = self._crop_weights(crops, k0)
        scores = [self._wca(crops, weights)]
        all_boxes, all_weights, expanded = [boxes], [weights], []
        steps = params.steps if params.method == "lgca" else 0
        for _ in range(steps):
            top = weights.topk(params.expand_top, dim=1).indices
            chosen = boxes.gather(1, top[..., None].expand(-1, -1, 4))
            grown = expand_boxes(chosen, params.expand_ratio, sizes)
            boxes = boxes.scatter(1, top[..., None].expand(-1, -1, 4), grown)
            fresh = self._encode(pixels, grown)
            crops = crops.scatter(1, top[..., None].expand(-1, -1, crops.shape[2]), fresh)
            weights = self._crop_weights(crops, k0)
            scores.append(self._wca(crops, weights))
            all_boxes.append(boxes)
            all_weights.append(weights)
            expanded.append(top)
        result = dict(clip=clip.cpu(), cupl=cupl.cpu(), wca=scores[0].cpu(),
                      boxes=torch.stack(all_boxes).cpu(), weights=torch.stack(all_weights).cpu())
        if params.method == "lgca":
            step_scores = torch.stack(scores)
            a = torch.tensor(params.step_weights, device=step_scores.device)
            result.update(steps=step_scores.cpu(), lgca=torch.einsum("t,tbc->bc", a, step_scores).cpu(),
                          expanded=torch.stack(expanded).cpu() if expanded
                          else torch.zeros(0, len(k0), params.expand_top, dtype=torch.long))
        return BatchScores(**result)

    def _encode(self, pixels: PixelBatch, boxes: torch.Tensor) -> torch.Tensor:
        """Embed the crops ``boxes`` ``[B, M, 4]`` of each image: ``[B, M, D]`` normalised."""
        count, per_image = boxes.shape[0], boxes.shape[1]
        flat = boxes.reshape(-1, 4)
        index = torch.arange(count, device=flat.device).repeat_interleave(per_image)
        step = encode_chunk(self.params, self.device)
        out = []
        for start in range(0, flat.shape[0], step):
            inputs = cut_crops(pixels, index[start:start + step], flat[start:start + step],
                               self.preprocess, self.dtype)
            out.append(F.normalize(self.model.encode_image(inputs).float(), dim=-1))
        return torch.cat(out).view(count, per_image, -1)

    def _crop_weights(self, crops: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
        """``w_i = softmax_i(lambda_v * cos(k_i, k_0))``: ``[B, N]``."""
        return torch.softmax(self.params.lambda_v * torch.einsum("bnd,bd->bn", crops, k0), dim=1)

    def _wca(self, crops: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``S(x, c) = cos(normalize(sum_i w_i k_i), u_c)``: ``[B, C]``."""
        pooled = F.normalize(torch.einsum("bn,bnd->bd", weights, crops), dim=-1)
        return pooled @ self.bank.vectors.T
