"""The scoring engine in two stages: ``encode`` (images -> image states) and ``score`` (image
states + the text bank -> the clip, cupl, wca and lgca scores).

Everything the image encoder computes is independent of the classes: the crop weights use
only the image's own embeddings, the expansion picks boxes by those weights, and every
score is a cosine between one of the image's vectors (``k_0`` or a pooled ``p_t``) and a
class vector. So :meth:`Engine.encode` ends in :class:`ImageStates`, and a :class:`Scorer`
(the text side alone) turns states into :class:`BatchScores`; scoring images is the
composition of the two. Pure torch, no Ray and no open_clip: the model is any object with
``encode_image`` and ``encode_text``. Formulas and defaults are those of METHOD.md; LGCA's
expansion steps are the reconstructed rule documented in docs/method.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ScoringParams
from pipeline.method.boxes import expand_boxes, full_view_box, sample_boxes
from pipeline.method.crops import PixelBatch, Preprocess, cut_crops, pad_batch
from pipeline.method.textbank import TextBank, TextEncoder, build_text_bank

log = logging.getLogger(__name__)
R = TypeVar("R")

# Crops per encoder pass when encode_batch_size is 0. On a CPU, passes of 256 crops spend
# about 12 % of their time in page faults (tensors over glibc's 32 MB mmap threshold are
# mapped and unmapped at every op) and 32-crop passes none: 9-14 % faster for ViT-B-32 on
# 2 cores (docs/benchmarks.md). A GPU wants large passes.
AUTO_ENCODE_BATCH_CPU, AUTO_ENCODE_BATCH_GPU = 32, 256


def crops_per_pass(params: ScoringParams, device: torch.device) -> int:
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
class ImageStates:
    """The image side of B images: everything scoring needs, and nothing of the classes.

    ``full`` ``[B, D]``: ``k_0``. ``pooled`` ``[S, B, D]``: ``p_0 .. p_{S-1}`` with
    ``p_t = normalize(sum_i w_i^t k_i^t)``; S = T+1 for lgca, 1 (``p_0``, WCA's vector) for
    wca, None for clip/cupl. Both float32 and L2-normalised. ``grown`` ``[S-1, B, K, 4]``:
    the boxes expanded at steps 1..S-1 (original pixels; lgca only). From :meth:`Engine.encode`
    also ``boxes`` ``[S, B, N, 4]`` (the N boxes at each step), ``weights`` ``[S, B, N]``
    (``w^t``) and ``expanded`` ``[S-1, B, K]`` (indices of the expanded boxes); states read
    back from an output have only ``full``, ``pooled`` and ``grown``.
    """

    full: torch.Tensor
    pooled: torch.Tensor | None = None
    grown: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    expanded: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        """S, the pooled vectors held: T+1 (lgca), 1 (wca) or 0 (clip/cupl)."""
        return 0 if self.pooled is None else self.pooled.shape[0]

    def cpu(self) -> ImageStates:
        """The same states on the CPU."""
        return ImageStates(*(None if t is None else t.cpu() for t in
                             (self.full, self.pooled, self.grown, self.boxes, self.weights, self.expanded)))


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of B images over C classes (float32, on the CPU), and their states.

    ``clip``, ``cupl``: ``[B, C]``. For wca and lgca runs also ``wca`` ``[B, C]``
    (= ``steps[0]``). For lgca runs also ``steps`` ``[T+1, B, C]`` (``S_t``) and ``lgca``
    ``[B, C]``. ``states``: the :class:`ImageStates` they were computed from, on the CPU
    (``boxes``, ``weights``, ``expanded`` and :meth:`expanded_boxes` read them).
    """

    clip: torch.Tensor
    cupl: torch.Tensor
    states: ImageStates
    wca: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    lgca: torch.Tensor | None = None

    @property
    def boxes(self) -> torch.Tensor | None:
        """``[T+1, B, N, 4]``: the N boxes at each step (from encode only)."""
        return self.states.boxes

    @property
    def weights(self) -> torch.Tensor | None:
        """``[T+1, B, N]``: ``w^t`` (from encode only)."""
        return self.states.weights

    @property
    def expanded(self) -> torch.Tensor | None:
        """``[T, B, K]``: indices of the boxes expanded at steps 1..T (from encode only)."""
        return self.states.expanded

    def method(self, name: str) -> torch.Tensor:
        """The ``[B, C]`` scores of method ``name``."""
        scores = getattr(self, name)
        if scores is None:
            raise ValueError(f"method {name!r} was not computed in this run")
        return scores

    def expanded_boxes(self, step: int) -> torch.Tensor:
        """``[B, K, 4]``: the boxes as expanded at ``step`` (1..T)."""
        return self.states.grown[step - 1]


class Scorer:
    """The text side: scores :class:`ImageStates` against a fixed set of classes.

    Holds the :class:`~pipeline.method.textbank.TextBank` (built once per holder) and the
    scoring parameters; only ``method``, ``steps`` and ``aggregation`` matter here.
    """

    def __init__(self, bank: TextBank, params: ScoringParams):
        self.bank = bank
        self.params = params

    @classmethod
    def build(cls, model: TextEncoder, tokenizer: Callable[[list[str]], torch.Tensor], names: Sequence[str],
              prompts: Sequence[Sequence[str]], descriptions: Sequence[Sequence[str]], params: ScoringParams,
              device: torch.device, text_batch_size: int = 256) -> Scorer:
        """Encode the class texts with ``model``'s text tower (its image tower is never run)."""
        return cls(build_text_bank(model, tokenizer, names, prompts, descriptions, params.lambda_t,
                                   text_batch_size, device), params)

    @classmethod
    def for_classes(cls, loaded, classes, params: ScoringParams) -> Scorer:
        """A scorer for a loaded model (:class:`pipeline.model.loading.LoadedModel`) and a
        :class:`pipeline.model.classes.ClassSet` (both duck-typed: no open_clip import here)."""
        return cls.build(loaded.model, loaded.tokenizer, classes.names,
                         [classes.prompts(i) for i in range(len(classes.names))], classes.descriptions,
                         params, loaded.device)

    def needed_steps(self) -> int:
        """The pooled vectors the method needs: T+1 (lgca), 1 (wca), 0 (clip/cupl)."""
        return {"lgca": self.params.steps + 1, "wca": 1}.get(self.params.method, 0)

    def score(self, states: ImageStates) -> BatchScores:
        """Scores of ``states`` (on the bank's device); see :class:`BatchScores`. An lgca
        scorer with T steps uses ``p_0 .. p_T`` of states that hold more (steps are sequential,
        so these are the states a T-step encoder gives)."""
        params, bank, needed = self.params, self.bank, self.needed_steps()
        if states.steps < needed:
            raise ValueError(f"method {params.method} with steps={params.steps} needs {needed} pooled vectors "
                             f"per image; these states hold {states.steps}")
        with torch.inference_mode():
            clip, cupl = states.full @ bank.anchors.T, states.full @ bank.cupl.T
            if not needed:
                return BatchScores(clip=clip.cpu(), cupl=cupl.cpu(), states=states.cpu())
            pooled = states.pooled[:needed]  # [S, B, D], as one [S*B, D] matrix: one large GEMM is the fastest
            steps = (pooled.reshape(-1, pooled.shape[2]) @ bank.vectors.T).view(needed, pooled.shape[1], -1)
            result = dict(clip=clip.cpu(), cupl=cupl.cpu(), wca=steps[0].cpu())
            if params.method == "lgca":
                a = torch.tensor(params.step_weights, device=steps.device)
                result.update(steps=steps.cpu(), lgca=torch.einsum("t,tbc->bc", a, steps).cpu())
                if states.grown is not None and states.grown.shape[0] > params.steps:
                    states = replace(states, grown=states.grown[:params.steps])
        return BatchScores(states=states.cpu(), **result)


class ImageEncoder:
    """The image side: encodes images into :class:`ImageStates` (``params`` says which: the full
    view only for clip/cupl, the N crops for wca, and T expansion steps for lgca)."""

    def __init__(self, model: ClipLike, params: ScoringParams, preprocess: Preprocess, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.params = params
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype

    def encode(self, images: Sequence[ImageInput]) -> ImageStates:
        """The image side of a batch (on the encoder's device); see :class:`ImageStates`."""
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
            if not params.needs_crops:
                return ImageStates(full=k0)
            sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)
            return self._crop_steps(pixels, k0, views[:, 1:], embedded[:, 1:], sizes)

    def _crop_steps(self, pixels: PixelBatch, k0: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
                    sizes: torch.Tensor) -> ImageStates:
        """WCA's pooled vector on the sampled boxes (step 0), then LGCA's expansion steps 1..T."""
        params = self.params
        weights = self._crop_weights(crops, k0)
        pooled = [self._pool(crops, weights)]
        all_boxes, all_weights, expanded, grown_boxes = [boxes], [weights], [], []
        steps = params.steps if params.method == "lgca" else 0
        for _ in range(steps):
            top = weights.topk(params.expand_top, dim=1).indices
            chosen = boxes.gather(1, top[..., None].expand(-1, -1, 4))
            grown = expand_boxes(chosen, params.expand_ratio, sizes)
            boxes = boxes.scatter(1, top[..., None].expand(-1, -1, 4), grown)
            fresh = self._encode(pixels, grown)
            crops = crops.scatter(1, top[..., None].expand(-1, -1, crops.shape[2]), fresh)
            weights = self._crop_weights(crops, k0)
            pooled.append(self._pool(crops, weights))
            all_boxes.append(boxes)
            all_weights.append(weights)
            expanded.append(top)
            grown_boxes.append(grown)
        states = ImageStates(full=k0, pooled=torch.stack(pooled), boxes=torch.stack(all_boxes),
                             weights=torch.stack(all_weights))
        if params.method != "lgca":
            return states
        count, k = len(k0), params.expand_top
        return replace(states, expanded=torch.stack(expanded) if expanded else
                       torch.zeros(0, count, k, dtype=torch.long, device=k0.device),
                       grown=torch.stack(grown_boxes) if grown_boxes else
                       torch.zeros(0, count, k, 4, dtype=boxes.dtype, device=k0.device))

    def _encode(self, pixels: PixelBatch, boxes: torch.Tensor) -> torch.Tensor:
        """Embed the crops ``boxes`` ``[B, M, 4]`` of each image: ``[B, M, D]`` normalised."""
        count, per_image = boxes.shape[0], boxes.shape[1]
        flat = boxes.reshape(-1, 4)
        index = torch.arange(count, device=flat.device).repeat_interleave(per_image)
        step = crops_per_pass(self.params, self.device)
        out = []
        for start in range(0, flat.shape[0], step):
            inputs = cut_crops(pixels, index[start:start + step], flat[start:start + step],
                               self.preprocess, self.dtype)
            out.append(F.normalize(self.model.encode_image(inputs).float(), dim=-1))
        return torch.cat(out).view(count, per_image, -1)

    def _crop_weights(self, crops: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
        """``w_i = softmax_i(lambda_v * cos(k_i, k_0))``: ``[B, N]``."""
        return torch.softmax(self.params.lambda_v * torch.einsum("bnd,bd->bn", crops, k0), dim=1)

    @staticmethod
    def _pool(crops: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``p = normalize(sum_i w_i k_i)``: ``[B, D]``, WCA's image vector (``S = cos(p, u_c)``)."""
        return F.normalize(torch.einsum("bn,bnd->bd", weights, crops), dim=-1)


class Engine(ImageEncoder):
    """Encodes images (:meth:`encode`) and scores them against a fixed set of classes.

    Built once per model holder (an actor): the text bank is encoded in ``__init__``;
    :meth:`score` only encodes images, then scores their states.
    """

    def __init__(self, model: ClipLike, tokenizer: Callable[[list[str]], torch.Tensor],
                 names: Sequence[str], prompts: Sequence[Sequence[str]],
                 descriptions: Sequence[Sequence[str]], params: ScoringParams,
                 preprocess: Preprocess, device: torch.device, dtype: torch.dtype = torch.float32,
                 text_batch_size: int = 256):
        super().__init__(model, params, preprocess, device, dtype)
        self.scorer = Scorer.build(model, tokenizer, names, prompts, descriptions, params, device, text_batch_size)

    @property
    def bank(self) -> TextBank:
        return self.scorer.bank

    @classmethod
    def for_classes(cls, loaded, classes, params: ScoringParams) -> Engine:
        """An engine for a loaded model (:class:`pipeline.model.loading.LoadedModel`) and a
        :class:`pipeline.model.classes.ClassSet` (both duck-typed: no open_clip import here)."""
        return cls(loaded.model, loaded.tokenizer, classes.names,
                   [classes.prompts(i) for i in range(len(classes.names))], classes.descriptions,
                   params, loaded.preprocess, loaded.device, loaded.dtype)

    def score(self, images: Sequence[ImageInput]) -> BatchScores:
        """Score a batch: ``score_states(encode(images))``; see :class:`BatchScores`."""
        return self.score_states(self.encode(images))

    def score_states(self, states: ImageStates) -> BatchScores:
        """Score image states with this engine's text bank (see :meth:`Scorer.score`)."""
        return self.scorer.score(states)


def score_apart(score: Callable[[list[ImageInput]], R], images: Sequence[ImageInput],
                ) -> list[tuple[list[int], R | None, str | None]]:
    """``score(images)`` together; if that raises RuntimeError or ValueError (out of memory, one
    bad image), each image alone, so that only an image that fails alone is an error.

    Returns groups ``(indices into images, result, None)``, or ``([i], None, 'score: <type>:
    <message>')`` for an image that failed alone, in the order of ``images``; no group for
    no images.
    """
    if not images:
        return []
    try:
        return [(list(range(len(images))), score(list(images)), None)]
    except (RuntimeError, ValueError) as exc:
        if len(images) == 1:
            return [([0], None, f"score: {type(exc).__name__}: {exc}")]
        log.warning("batch of %d failed (%s); scoring its images one by one", len(images), exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [([i], *score_apart(score, [image])[0][1:]) for i, image in enumerate(images)]
