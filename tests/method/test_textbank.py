"""The text bank: each distinct string encoded once, per-class softmax, batching."""
from __future__ import annotations

import torch

from pipeline.method.textbank import build_text_bank, encode_texts, segment_softmax
from tests.fakes import TextTable


class CountingText:
    def __init__(self, table: TextTable):
        self.table, self.seen = table, []

    def encode_text(self, tokens):
        self.seen.extend(tokens[:, 0].tolist())
        return self.table.table[tokens[:, 0]].float()


def test_segment_softmax_equals_a_softmax_per_class():
    logits = torch.tensor([1.0, 2.0, 0.5, 3.0, -1.0])
    owner = torch.tensor([0, 0, 1, 1, 1])
    out = segment_softmax(logits, owner, 2)
    torch.testing.assert_close(out[:2], torch.softmax(logits[:2], 0))
    torch.testing.assert_close(out[2:], torch.softmax(logits[2:], 0))


def test_each_distinct_string_is_encoded_once_in_batches():
    texts = ["a", "b", "a", "c", "b", "d", "e"]
    table = TextTable(texts, 4)
    model = CountingText(table)
    out = encode_texts(model, table.tokenize, texts, batch_size=2, device=torch.device("cpu"))
    assert sorted(model.seen) == sorted(set(table.index.values()))  # 5 distinct, once each
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(texts)))


def test_duplicate_descriptions_still_count_twice_in_the_weights():
    prompts = [["p0"], ["p1"]]
    descriptions = [["x", "x", "y"], ["z"]]
    table = TextTable(["p0", "p1", "x", "y", "z"], 6)
    bank = build_text_bank(CountingText(table), table.tokenize, ["c0", "c1"], prompts, descriptions,
                           lambda_t=2.0, batch_size=8, device=torch.device("cpu"))
    assert bank.owner.tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(bank.weights[0], bank.weights[1])
    torch.testing.assert_close(bank.weights[:3].sum(), torch.tensor(1.0))
    assert bank.weights[3].item() == 1.0


def test_bank_keeps_class_matrices_and_per_description_scalars_only():
    """The engine's memory per actor: [C, D] matrices and [M] vectors, no [M, D] embeddings."""
    names = ["c0", "c1", "c2"]
    prompts = [[f"p{c}"] for c in range(3)]
    descriptions = [[f"d{c}{j}" for j in range(40)] for c in range(3)]
    table = TextTable([t for p in prompts for t in p] + [t for d in descriptions for t in d], 16)
    bank = build_text_bank(CountingText(table), table.tokenize, names, prompts, descriptions,
                           lambda_t=2.0, batch_size=32, device=torch.device("cpu"))
    shapes = {name: tuple(value.shape) for name, value in vars(bank).items() if isinstance(value, torch.Tensor)}
    assert shapes == {"anchors": (3, 16), "cupl": (3, 16), "vectors": (3, 16), "owner": (120,), "weights": (120,)}
