"""The engine against a loop-based transcription of METHOD.md, written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ScoringParams
from pipeline.method.engine import Engine, ImageInput, ImageStates, Scorer, crops_per_pass, score_apart
from tests.fakes import RAW, BoxEncoder, TextTable, ramp_image

NAMES = ["heron", "kite", "owl", "wren"]
PROMPTS = [[f"a photo of a {n}.", f"a {n} in the wild."] for n in NAMES]
DESCRIPTIONS = [
    ["long legs", "grey feathers", "wades in water"],
    ["forked tail", "soars"],
    [],  # no descriptions: the prompts stand in
    ["tiny", "brown", "cocked tail", "loud song"],
]
DIM = 12


# ---- reference: METHOD.md, one formula at a time, in plain loops ----------------------

def normalize(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def cos(a, b):
    return sum(x * y for x, y in zip(normalize(a), normalize(b)))


def softmax(values):
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    return [e / sum(exps) for e in exps]


def weighted_sum(weights, vectors):
    return [sum(w * v[d] for w, v in zip(weights, vectors)) for d in range(len(vectors[0]))]


def reference_text(text: TextTable, lambda_t: float):
    """t_c, normalize(mean_j t_cj) and u_c for every class."""
    anchors, cupl, vectors = [], [], []
    for prompts, descs in zip(PROMPTS, DESCRIPTIONS):
        t_c = normalize(weighted_sum([1 / len(prompts)] * len(prompts),
                                     [normalize(text.embed(p)) for p in prompts]))
        t_cj = [normalize(text.embed(y)) for y in (descs or prompts)]
        v = softmax([lambda_t * cos(t, t_c) for t in t_cj])
        anchors.append(t_c)
        cupl.append(normalize(weighted_sum([1 / len(t_cj)] * len(t_cj), t_cj)))
        vectors.append(normalize(weighted_sum(v, t_cj)))
    return anchors, cupl, vectors


def reference_expand(box, r, height, width):
    x0, y0, x1, y1 = box
    side = min((x1 - x0) * r, min(height, width))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx = min(max(cx - side / 2, 0.0), width - side)
    ny = min(max(cy - side / 2, 0.0), height - side)
    return (nx, ny, nx + side, ny + side)


def reference_image(encoder, boxes, height, width, text_side, p: ScoringParams):
    """All four methods for one image whose initial boxes are ``boxes``."""
    anchors, cupl, vectors = text_side
    short = min(height, width)
    k0 = encoder.box_embedding((width - short) / 2, (height - short) / 2, short)
    boxes = [tuple(b) for b in boxes]
    k = [encoder.box_embedding(b[0], b[1], b[2] - b[0]) for b in boxes]
    step_scores, step_boxes = [], []
    for t in range(p.steps + 1):
        w = softmax([p.lambda_v * cos(ki, k0) for ki in k])
        pooled = weighted_sum(w, [normalize(ki) for ki in k])
        step_scores.append([cos(pooled, u) for u in vectors])
        step_boxes.append(list(boxes))
        if t == p.steps:
            break
        top = sorted(range(len(w)), key=lambda i: -w[i])[:p.expand_top]
        for i in top:
            boxes[i] = reference_expand(boxes[i], p.expand_ratio, height, width)
            k[i] = encoder.box_embedding(boxes[i][0], boxes[i][1], boxes[i][2] - boxes[i][0])
    a = p.step_weights
    lgca = [sum(a[t] * step_scores[t][c] for t in range(p.steps + 1)) for c in range(len(NAMES))]
    return {
        "clip": [cos(k0, t) for t in anchors],
        "cupl": [cos(k0, t) for t in cupl],
        "wca": step_scores[0],
        "steps": step_scores,
        "lgca": lgca,
        "boxes": step_boxes,
    }


# ---- fixtures --------------------------------------------------------------------------

def make_engine(params: ScoringParams):
    texts = [t for p in PROMPTS for t in p] + [t for d in DESCRIPTIONS for t in d]
    text = TextTable(texts, DIM)
    encoder = BoxEncoder(text, DIM)
    engine = Engine(encoder, text.tokenize, NAMES, PROMPTS, DESCRIPTIONS, params, RAW, torch.device("cpu"))
    return engine, encoder, text


IMAGES = [("img/a.png", 120, 200), ("img/b.png", 150, 90), ("img/c.png", 64, 64)]


def ramp_inputs():
    return [ImageInput(name, ramp_image(h, w), h, w) for name, h, w in IMAGES]


@pytest.mark.parametrize("params", [
    ScoringParams(),
    ScoringParams(crops=20, steps=2, expand_top=4, expand_ratio=1.5, aggregation="last", seed=7),
    ScoringParams(crops=12, steps=1, expand_top=3, aggregation="0.2,0.8", encode_batch_size=7,
                  alpha=0.3, beta=0.6, lambda_v=10.0, lambda_t=3.0),
])
def test_every_method_matches_the_loop_transcription(params):
    engine, encoder, text = make_engine(params)
    result = engine.score(ramp_inputs())
    text_side = reference_text(text, params.lambda_t)
    for b, (name, h, w) in enumerate(IMAGES):
        ref = reference_image(encoder, result.boxes[0, b].tolist(), h, w, text_side, params)
        for method in ("clip", "cupl", "wca", "lgca"):
            np.testing.assert_allclose(result.method(method)[b].numpy(), ref[method], atol=2e-4,
                                       err_msg=f"{method} of {name}")
        np.testing.assert_allclose(result.steps[:, b].numpy(), ref["steps"], atol=2e-4)
        np.testing.assert_allclose(result.boxes[:, b].numpy(), np.array(ref["boxes"]), atol=1e-6)


def test_labels_agree_with_the_reference_argmax():
    params = ScoringParams(crops=30, seed=3)
    engine, encoder, text = make_engine(params)
    result = engine.score(ramp_inputs())
    text_side = reference_text(text, params.lambda_t)
    for b, (_, h, w) in enumerate(IMAGES):
        ref = reference_image(encoder, result.boxes[0, b].tolist(), h, w, text_side, params)
        assert int(result.lgca[b].argmax()) == int(np.argmax(ref["lgca"]))
        assert int(result.wca[b].argmax()) == int(np.argmax(ref["wca"]))


def test_the_text_bank_is_built_once_and_reused():
    engine, encoder, text = make_engine(ScoringParams(crops=8, steps=1, expand_top=2))
    bank = engine.bank
    engine.score(ramp_inputs())
    engine.score(ramp_inputs()[:1])
    assert engine.bank is bank
    # class 'owl' has no descriptions: its description vector is its prompts' weighted mean
    ref = reference_text(text, engine.params.lambda_t)
    np.testing.assert_allclose(bank.vectors[2].numpy(), ref[2][2], atol=1e-6)


@pytest.mark.parametrize("method,expected", [("lgca", 1 + 60 + 3 * 6), ("wca", 1 + 60),
                                             ("clip", 1), ("cupl", 1)])
def test_image_encoder_sees_exactly_the_method_cost(method, expected):
    params = ScoringParams(method=method)
    engine, encoder, _ = make_engine(params)
    engine.score(ramp_inputs())
    assert encoder.images_seen == expected * len(IMAGES)
    assert params.encoder_inputs_per_image() == expected


def test_image_encoder_cost_follows_the_parameters():
    params = ScoringParams(crops=25, steps=4, expand_top=5, encode_batch_size=16)
    engine, encoder, _ = make_engine(params)
    engine.score(ramp_inputs())
    assert encoder.images_seen == (1 + 25 + 4 * 5) * len(IMAGES)
    assert max(encoder.pass_sizes) == 16


@pytest.mark.parametrize("device,chunk", [("cpu", 32), ("cuda", 256), ("mps", 256)])
def test_encoder_passes_are_sized_for_the_device_by_default(device, chunk):
    params = ScoringParams()
    assert params.encode_batch_size == 0 and crops_per_pass(params, torch.device(device)) == chunk
    assert crops_per_pass(ScoringParams(encode_batch_size=7), torch.device(device)) == 7
    engine, encoder, _ = make_engine(params)  # on the CPU: full view + 60 crops of each image
    engine.score(ramp_inputs())
    first = (1 + 60) * len(IMAGES)  # then 3 steps of 6 expanded crops per image
    expected = [32] * (first // 32) + ([first % 32] if first % 32 else [])
    assert encoder.pass_sizes[:len(expected)] == expected
    assert sum(encoder.pass_sizes) == (first + 3 * 6 * len(IMAGES)) and max(encoder.pass_sizes) == 32


def test_scores_of_an_image_do_not_depend_on_its_batch():
    engine, _, _ = make_engine(ScoringParams(crops=16, seed=11))
    images = ramp_inputs()
    together = engine.score(images)
    alone = engine.score([images[1]])
    reordered = engine.score([images[2], images[1]])
    np.testing.assert_allclose(alone.lgca[0].numpy(), together.lgca[1].numpy(), atol=1e-6)
    np.testing.assert_allclose(reordered.lgca[1].numpy(), together.lgca[1].numpy(), atol=1e-6)
    np.testing.assert_array_equal(alone.boxes[:, 0].numpy(), together.boxes[:, 1].numpy())


def test_expanded_boxes_are_the_top_weighted_boxes_grown():
    params = ScoringParams(crops=20, steps=2, expand_top=3)
    engine, _, _ = make_engine(params)
    result = engine.score(ramp_inputs())
    for t in (1, 2):
        for b, (_, h, w) in enumerate(IMAGES):
            top = torch.topk(result.weights[t - 1, b], 3).indices
            assert sorted(result.expanded[t - 1, b].tolist()) == sorted(top.tolist())
            for i in top.tolist():
                expected = reference_expand(result.boxes[t - 1, b, i].tolist(), 1.25, h, w)
                np.testing.assert_allclose(result.boxes[t, b, i].numpy(), expected, atol=1e-9)
            np.testing.assert_allclose(result.expanded_boxes(t)[b].numpy(),
                                       result.boxes[t, b, result.expanded[t - 1, b]].numpy())


def test_clip_only_runs_report_no_crop_scores():
    engine, _, _ = make_engine(ScoringParams(method="cupl"))
    result = engine.score(ramp_inputs())
    assert result.wca is None and result.lgca is None
    with pytest.raises(ValueError, match="not computed"):
        result.method("lgca")


# ---- the paper's Figure 1 case with an interpretable encoder ----------------------------

class BlueShareEncoder(torch.nn.Module):
    """Embeds a region by its share of blue pixels, as an angle on the unit circle.

    A region with blue share ``f`` maps to ``(cos θ, sin θ)`` with ``θ = f / 0.3 * 90°``;
    a colour word maps to the angle of the share it names. Pixels reach it normalised
    with mean 0.5 and std 0.5, so the blue channel is -1 (red) or +1 (blue).
    """

    SHARES = {"purple": 0.3, "crimson": 0.2}

    @staticmethod
    def angle(share: torch.Tensor) -> torch.Tensor:
        theta = share * (math.pi / 2) / 0.3
        return torch.stack([theta.cos(), theta.sin()], dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[list(self.SHARES).index(t)] for t in texts])

    def encode_image(self, crops: torch.Tensor) -> torch.Tensor:
        return self.angle((crops[:, 2].float().mean(dim=(1, 2)) + 1) / 2)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.angle(torch.tensor(list(self.SHARES.values()))[tokens[:, 0]])


def purple_picture(size: int = 120, stripe: int = 18) -> np.ndarray:
    """Red in the middle, a blue stripe down each side: 30% blue overall ('purple').

    No crop narrower than ``size - 2 * stripe`` sees both stripes, so every crop is
    redder than the whole ('crimson'); only crops grown towards the full view are purple.
    """
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = (255, 0, 0)
    image[:, :stripe] = image[:, size - stripe:] = (0, 0, 255)
    return image


@pytest.mark.parametrize("seed", range(8))
def test_figure1_expansion_moves_the_decision_from_the_crops_to_the_whole(seed):
    encoder = BlueShareEncoder()
    names = list(BlueShareEncoder.SHARES)
    params = ScoringParams(alpha=0.65, beta=0.8, expand_ratio=1.5, seed=seed)
    preprocess = RAW.__class__(image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    engine = Engine(encoder, encoder.tokenize, names, [[n] for n in names], [[], []], params,
                    preprocess, torch.device("cpu"))
    result = engine.score([ImageInput("figure-1", purple_picture(), 120, 120)])
    label = {m: names[int(result.method(m)[0].argmax())] for m in ("clip", "wca", "lgca")}
    assert label == {"clip": "purple", "wca": "crimson", "lgca": "purple"}
    # step 0 is WCA; by the last step the most weighted crop spans both stripes
    assert names[int(result.steps[0, 0].argmax())] == "crimson"
    assert names[int(result.steps[-1, 0].argmax())] == "purple"
    top = result.boxes[-1, 0, int(result.weights[-1, 0].argmax())]
    assert top[0] < 18 and top[2] > 102


def test_the_engine_imports_neither_ray_nor_open_clip():
    import subprocess
    import sys

    code = ("import sys, pipeline.method.engine; "
            "print(sorted(m for m in ('ray', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the two stages: encode (no classes) and score (states + text bank) -----------------

OTHER_NAMES = ["wren", "stork", "heron", "gull", "finch"]


def make_scorer(params: ScoringParams, names=NAMES, prompts=PROMPTS, descriptions=DESCRIPTIONS):
    """A scorer from a text-only model: an object with encode_text and no encode_image."""
    text = TextTable([t for p in prompts for t in p] + [t for d in descriptions for t in d], DIM)

    class TextOnly:
        encode_text = staticmethod(lambda tokens: text.table[tokens[:, 0]].float())

    return Scorer.build(TextOnly(), text.tokenize, names, prompts, descriptions, params, torch.device("cpu"))


def read_back(states: ImageStates) -> ImageStates:
    """What an output keeps of states: k_0, p_0..p_T and the expanded boxes (float32 bytes)."""
    def again(t):
        return None if t is None else torch.from_numpy(np.frombuffer(bytearray(t.numpy().tobytes()), "<f4").reshape(t.shape))
    return ImageStates(full=again(states.full), pooled=again(states.pooled), grown=again(states.grown.float()))


def assert_same_scores(a, b, methods=("clip", "cupl", "wca", "lgca")):
    for method in methods:
        torch.testing.assert_close(a.method(method), b.method(method), rtol=0, atol=0, msg=method)


def test_scoring_images_is_scoring_their_states_exactly():
    engine, _, _ = make_engine(ScoringParams(crops=16, steps=3, expand_top=4))
    images = ramp_inputs()
    direct = engine.score(images)
    states = engine.encode(images)
    assert states.full.shape == (3, DIM) and states.pooled.shape == (4, 3, DIM) and states.grown.shape == (3, 3, 4, 4)
    composed = engine.score_states(states)
    assert_same_scores(direct, composed)
    torch.testing.assert_close(direct.steps, composed.steps, rtol=0, atol=0)
    again = engine.score_states(read_back(states))  # as relabel reads them: no boxes, no weights
    assert_same_scores(direct, again)
    for t in (1, 2, 3):
        torch.testing.assert_close(again.expanded_boxes(t), direct.expanded_boxes(t).float(), rtol=0, atol=0)


def test_states_do_not_depend_on_the_classes_and_other_classes_score_them_exactly():
    params = ScoringParams(crops=12, steps=2, expand_top=3, seed=4)
    engine_a, _, _ = make_engine(params)
    names = OTHER_NAMES
    prompts = [[f"a photo of a {n}."] for n in names]
    descriptions = [["long neck", "white"], [], ["grey"], ["yellow beak", "small"], ["tiny"]]
    texts = [t for p in prompts for t in p] + [t for d in descriptions for t in d]
    text_b = TextTable(texts, DIM, seed=9)
    engine_b = Engine(BoxEncoder(text_b, DIM), text_b.tokenize, names, prompts, descriptions, params, RAW,
                      torch.device("cpu"))
    images = ramp_inputs()
    states_a, states_b = engine_a.encode(images), engine_b.encode(images)
    for field in ("full", "pooled", "grown", "boxes", "weights", "expanded"):
        torch.testing.assert_close(getattr(states_a, field), getattr(states_b, field), rtol=0, atol=0)
    scorer_b = Scorer(engine_b.bank, params)
    assert_same_scores(scorer_b.score(states_a), engine_b.score(images))


def test_fewer_steps_and_simpler_methods_use_a_prefix_of_the_states():
    base = dict(crops=14, expand_top=3, seed=2)
    states = make_engine(ScoringParams(steps=3, **base))[0].encode(ramp_inputs())
    fewer_engine = make_engine(ScoringParams(steps=1, aggregation="last", **base))[0]
    fewer = fewer_engine.scorer.score(states)  # T = 1 on states of T = 3: p_0, p_1 are a prefix
    assert_same_scores(fewer, fewer_engine.score(ramp_inputs()))
    assert fewer.steps.shape[0] == 2 and fewer.states.grown.shape[0] == 1
    wca_engine = make_engine(ScoringParams(method="wca", **base))[0]
    assert_same_scores(wca_engine.scorer.score(states), wca_engine.score(ramp_inputs()), ("clip", "cupl", "wca"))
    clip_engine = make_engine(ScoringParams(method="clip", **base))[0]
    clip_states = clip_engine.encode(ramp_inputs())
    assert clip_states.pooled is None and clip_states.steps == 0
    assert_same_scores(clip_engine.scorer.score(states), clip_engine.score(ramp_inputs()), ("clip", "cupl"))


def test_a_scorer_needs_no_image_tower_and_refuses_states_that_cannot_give_its_method():
    params = ScoringParams(crops=10, steps=2, expand_top=2)
    engine, _, _ = make_engine(params)
    states = engine.encode(ramp_inputs())
    scorer = make_scorer(params)
    torch.testing.assert_close(scorer.bank.vectors, engine.bank.vectors, rtol=0, atol=0)
    assert_same_scores(scorer.score(states), engine.score(ramp_inputs()))
    wca_states = make_engine(ScoringParams(method="wca", crops=10))[0].encode(ramp_inputs())
    with pytest.raises(ValueError, match="needs 3 pooled vectors per image; these states hold 1"):
        scorer.score(wca_states)
    with pytest.raises(ValueError, match="needs 1 pooled"):
        make_scorer(ScoringParams(method="wca")).score(ImageStates(full=states.full))


def test_score_apart_isolates_the_image_that_fails_alone():
    calls = []

    def score(images):
        calls.append([image.image_id for image in images])
        if any(image.image_id == "img/b.png" for image in images):
            raise RuntimeError("out of memory (simulated)")
        return len(images)

    images = ramp_inputs()
    assert score_apart(score, images[:1]) == [([0], 1, None)]
    groups = score_apart(score, images)
    assert groups == [([0], 1, None), ([1], None, "score: RuntimeError: out of memory (simulated)"),
                      ([2], 1, None)]
    assert calls[1:] == [["img/a.png", "img/b.png", "img/c.png"], ["img/a.png"], ["img/b.png"], ["img/c.png"]]
    assert score_apart(score, []) == []
