"""Interpretable stand-ins for a CLIP model, for engine tests without open_clip.

``RampImage`` images carry their own coordinates in their pixels, so an encoder can
read back which box a crop came from; ``BoxEncoder`` turns that box into a fixed
random embedding that a test can also compute from the box alone.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.method.crops import Preprocess

# Crops reach the encoder as raw 0..255 values: (x / 255 - 0) / (1 / 255).
RAW = Preprocess(image_size=16, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def ramp_image(height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` with R = column index and G = row index (H, W <= 256)."""
    assert height <= 256 and width <= 256
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    image[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    return image


class TextTable:
    """A tokenizer and text encoder that give each known string a fixed random embedding."""

    def __init__(self, texts: list[str], dim: int, seed: int = 1):
        self.index = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(self.index), dim, generator=gen, dtype=torch.float64)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.index[t]] for t in texts])

    def embed(self, text: str) -> np.ndarray:
        return self.table[self.index[text]].numpy()


class BoxEncoder(torch.nn.Module):
    """Reads a crop's box back from a ramp image and embeds it with a fixed random map.

    ``box_embedding`` is the same map applied to a known box, for reference code.
    """

    def __init__(self, text: TextTable, dim: int, seed: int = 2):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3, dim, generator=gen, dtype=torch.float64) / 40.0
        self.phase = torch.rand(dim, generator=gen, dtype=torch.float64) * 6.28
        self.text = text
        self.images_seen = 0
        self.pass_sizes: list[int] = []  # crops per encode_image call

    def box_embedding(self, x0: float, y0: float, side: float) -> np.ndarray:
        feats = torch.tensor([x0, y0, side], dtype=torch.float64)
        return torch.sin(feats @ self.proj + self.phase).numpy()

    def encode_image(self, crops: torch.Tensor) -> torch.Tensor:
        self.images_seen += crops.shape[0]
        self.pass_sizes.append(crops.shape[0])
        size = crops.shape[-1]
        x = crops[:, 0].double().mean(dim=1)  # [M, S] ramp values per output column
        y = crops[:, 1].double().mean(dim=2)  # [M, S] per output row
        side_x = (x[:, size - 2] - x[:, 1]) * size / (size - 3)
        x0 = x[:, 1] + 0.5 - 1.5 * side_x / size
        y0 = y[:, 1] + 0.5 - 1.5 * side_x / size
        feats = torch.stack([x0, y0, side_x], dim=1)
        return torch.sin(feats @ self.proj + self.phase).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.table[tokens[:, 0]].float()
