"""The text side of METHOD.md, computed once per job: anchors, descriptions, weights.

Every distinct string is encoded once, in batches; the per-class reductions
(softmax over a class's descriptions, weighted sums) run as segment operations over
one flat tensor of descriptions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F


class TextEncoder(Protocol):
    """Anything with open_clip's ``encode_text`` (token ids ``[n, L]`` to ``[n, D]``)."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TextBank:
    """Class-side embeddings, all L2-normalised and float32.

    ``anchors`` ``[C, D]``: ``t_c``, the mean of the class's prompt embeddings.
    ``cupl`` ``[C, D]``: ``normalize(mean_j t_cj)``.
    ``vectors`` ``[C, D]``: ``u_c = normalize(sum_j v_cj t_cj)``.
    ``owner`` ``[M]`` and ``weights`` ``[M]``: the class index and the weight ``v_cj`` of
    every description ``t_cj``. The description embeddings themselves (``[M, D]``, 100 MB
    for 1000 classes of 50 descriptions at D = 512) are not kept: scoring needs only the
    three ``[C, D]`` matrices.
    """

    names: tuple[str, ...]
    anchors: torch.Tensor
    cupl: torch.Tensor
    vectors: torch.Tensor
    owner: torch.Tensor
    weights: torch.Tensor


def encode_texts(model: TextEncoder, tokenizer: Callable[[list[str]], torch.Tensor],
                 texts: Sequence[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """Encode each distinct string once; returns normalised float32 ``[len(texts), D]``."""
    unique = list(dict.fromkeys(texts))
    position = {text: i for i, text in enumerate(unique)}
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(unique), batch_size):
            tokens = tokenizer(unique[start:start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    embeddings = torch.cat(chunks)
    return embeddings[torch.tensor([position[t] for t in texts], device=embeddings.device)]


def segment_softmax(logits: torch.Tensor, owner: torch.Tensor, segments: int) -> torch.Tensor:
    """Softmax of ``logits`` ``[M]`` within each group of equal ``owner`` ``[M]``."""
    peak = torch.full((segments,), float("-inf"), device=logits.device)
    peak = peak.scatter_reduce(0, owner, logits, reduce="amax")
    exp = torch.exp(logits - peak[owner])
    total = torch.zeros(segments, device=logits.device).index_add(0, owner, exp)
    return exp / total[owner]


def build_text_bank(model: TextEncoder, tokenizer: Callable[[list[str]], torch.Tensor],
                    names: Sequence[str], prompts: Sequence[Sequence[str]],
                    descriptions: Sequence[Sequence[str]], lambda_t: float,
                    batch_size: int, device: torch.device) -> TextBank:
    """Build the text bank for classes ``names``.

    ``prompts[c]`` are the templates formatted with class ``c``'s name; a class whose
    ``descriptions[c]`` is empty uses its prompts as descriptions.
    """
    classes = len(names)
    descs = [list(d) if d else list(p) for p, d in zip(prompts, descriptions)]
    prompt_owner = [c for c in range(classes) for _ in prompts[c]]
    desc_owner = [c for c in range(classes) for _ in descs[c]]
    flat = [t for p in prompts for t in p] + [t for d in descs for t in d]
    embedded = encode_texts(model, tokenizer, flat, batch_size, device)
    prompt_emb, desc_emb = embedded[:len(prompt_owner)], embedded[len(prompt_owner):]
    dev = embedded.device
    p_owner = torch.tensor(prompt_owner, device=dev)
    owner = torch.tensor(desc_owner, device=dev)
    dim = embedded.shape[1]
    anchors = F.normalize(torch.zeros(classes, dim, device=dev).index_add(0, p_owner, prompt_emb), dim=-1)
    weights = segment_softmax(lambda_t * (desc_emb * anchors[owner]).sum(-1), owner, classes)
    vectors = torch.zeros(classes, dim, device=dev).index_add(0, owner, weights[:, None] * desc_emb)
    cupl = torch.zeros(classes, dim, device=dev).index_add(0, owner, desc_emb)
    return TextBank(names=tuple(names), anchors=anchors, cupl=F.normalize(cupl, dim=-1),
                    vectors=F.normalize(vectors, dim=-1), owner=owner, weights=weights)
