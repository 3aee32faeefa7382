"""Batched roi_align crops against the model's own preprocessing of the same crop."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from torchvision.ops import roi_align

from pipeline.config import ModelConfig, ScoringParams
from pipeline.method.boxes import sample_boxes
from pipeline.method.crops import PAD_LIMIT, Preprocess, cut_crops, pad_batch, pad_groups
from pipeline.method.engine import Engine, ImageInput
from pipeline.model.loading import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    with pytest.warns(UserWarning, match="meaningless"):
        return load_model(ModelConfig(name="lgca-tiny", pretrained="none", device="cpu"))


@pytest.fixture(scope="module")
def model_transform(tiny):
    """open_clip's own eval transform for the loaded model (resize short side, centre crop)."""
    return open_clip.image_transform(tiny.preprocess.image_size, is_train=False,
                                     mean=tiny.preprocess.mean, std=tiny.preprocess.std,
                                     interpolation=tiny.preprocess.interpolation,
                                     resize_mode=tiny.preprocess.resize_mode)


def embed(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return F.normalize(model.encode_image(batch).float(), dim=-1)


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "coffee", "rocket"])
def test_crop_embeddings_match_the_models_own_preprocessing(tiny, model_transform, photo):
    pixels = getattr(data, photo)()
    height, width = pixels.shape[:2]
    boxes = [(0, 0, height // 2, height // 2), (width - 300, 40, width, 340),
             (width // 4, height // 5, width // 4 + 200, height // 5 + 200),
             (0, 0, min(height, width), min(height, width))]
    batch = pad_batch([pixels], [(height, width)], CPU)
    ours = cut_crops(batch, torch.zeros(len(boxes), dtype=torch.long),
                     torch.tensor(boxes, dtype=torch.float64), tiny.preprocess, torch.float32)
    image = Image.fromarray(pixels)
    theirs = torch.stack([model_transform(image.crop(box)) for box in boxes])
    cosine = (embed(tiny.model, ours) * embed(tiny.model, theirs)).sum(-1)
    assert cosine.min().item() >= 0.99, cosine.tolist()
    # random weights put every photo near one direction, so also demand that each crop is
    # far closer to its own reference than to the reference of another crop
    other = (embed(tiny.model, ours) * embed(tiny.model, theirs.roll(1, 0))).sum(-1)
    assert ((1 - cosine) * 20 < (1 - other)).all(), (cosine.tolist(), other.tolist())
    # the pixels themselves agree to within a few grey levels on average
    std = torch.tensor(tiny.preprocess.std).view(1, 3, 1, 1) * 255
    assert ((ours - theirs) * std).abs().mean().item() < 6


def test_crops_from_a_downscaled_copy_use_original_coordinates(tiny):
    pixels = data.astronaut()  # 512 x 512
    half = np.asarray(Image.fromarray(pixels).resize((256, 256), Image.BICUBIC))
    box = torch.tensor([[100.0, 60.0, 400.0, 360.0]], dtype=torch.float64)
    index = torch.zeros(1, dtype=torch.long)
    full = cut_crops(pad_batch([pixels], [(512, 512)], CPU), index, box, tiny.preprocess, torch.float32)
    small = cut_crops(pad_batch([half], [(512, 512)], CPU), index, box, tiny.preprocess, torch.float32)
    cosine = (embed(tiny.model, full) * embed(tiny.model, small)).sum(-1).item()
    assert cosine >= 0.99


def test_padding_a_batch_does_not_change_any_crop(tiny):
    small, large = data.coffee(), data.astronaut()  # 400x600 and 512x512
    boxes = torch.tensor([[300.0, 100.0, 600.0, 400.0], [0.0, 0.0, 400.0, 400.0]], dtype=torch.float64)
    together = pad_batch([small, large], [(400, 600), (512, 512)], CPU)
    alone = pad_batch([small], [(400, 600)], CPU)
    both = cut_crops(together, torch.tensor([0, 0]), boxes, tiny.preprocess, torch.float32)
    one = cut_crops(alone, torch.tensor([0, 0]), boxes, tiny.preprocess, torch.float32)
    torch.testing.assert_close(both, one)


def test_photos_of_both_orientations_share_one_padded_group():
    shapes = [(448, 672), (672, 448)] * 16
    assert pad_groups(shapes) == [list(range(32))]


def test_padding_never_takes_more_than_twice_the_images_own_pixels():
    rng = np.random.default_rng(3)
    shapes = [(int(h), int(w)) for h, w in rng.integers(8, 5000, size=(64, 2))]
    groups = pad_groups(shapes)
    assert sorted(i for members in groups for i in members) == list(range(64))
    for members in groups:
        canvas = max(shapes[i][0] for i in members) * max(shapes[i][1] for i in members) * len(members)
        assert canvas <= PAD_LIMIT * sum(shapes[i][0] * shapes[i][1] for i in members)


def test_a_wide_and_a_tall_image_are_padded_apart_and_cut_as_if_alone(tiny):
    astronaut = data.astronaut()
    wide, tall, photo = astronaut[:60], astronaut[:, :60], data.coffee()  # 60x512, 512x60, 400x600
    images = [wide, tall, photo]
    batch = pad_batch(images, [image.shape[:2] for image in images], CPU)
    # padded together all three would be 512x600 each (3.1x their pixels); in groups 1.7x
    assert [tuple(g.shape) for g in batch.groups] == [(2, 3, 400, 600), (1, 3, 512, 60)]
    boxes = torch.tensor([[0, 0, 60, 60], [0, 100, 60, 160], [200, 100, 500, 400], [0, 400, 60, 460],
                          [452, 0, 512, 60]], dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 1, 0])
    together = cut_crops(batch, index, boxes, tiny.preprocess, torch.float32)
    for row, i in enumerate(index.tolist()):
        alone = cut_crops(pad_batch([images[i]], [images[i].shape[:2]], CPU), torch.tensor([0]), boxes[row:row + 1],
                          tiny.preprocess, torch.float32)
        torch.testing.assert_close(together[row:row + 1], alone)


def test_clip_scores_equal_open_clips_zero_shot_classifier(tiny):
    names = ["cat", "astronaut", "coffee cup", "rocket"]
    templates = ["a photo of a {}.", "a blurry photo of the {}."]
    size = tiny.preprocess.image_size
    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    # images already at the model's input size: both paths see exactly the same pixels
    images = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in photos]
    engine = Engine(tiny.model, tiny.tokenizer, names, [[t.format(n) for t in templates] for n in names],
                    [[] for _ in names], ScoringParams(method="clip"), tiny.preprocess, CPU)
    ours = engine.score([ImageInput(str(i), im, size, size) for i, im in enumerate(images)]).clip
    classifier = open_clip.build_zero_shot_classifier(
        tiny.model, tiny.tokenizer, names, [lambda c, t=t: t.format(c) for t in templates],
        device=CPU, use_tqdm=False)
    transform = open_clip.image_transform(size, is_train=False, mean=tiny.preprocess.mean,
                                          std=tiny.preprocess.std)
    batch = torch.stack([transform(Image.fromarray(im)) for im in images])
    theirs = embed(tiny.model, batch) @ classifier
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist()


def test_preprocess_rejects_models_it_cannot_reproduce():
    with pytest.raises(ValueError, match="longest"):
        Preprocess(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="longest")


def roi_align_reference(batch, index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's own roi_align on the same pixels and boxes (its CPU kernel), in 0..255."""
    scaled = boxes.float() * batch.scale[index][:, [1, 0, 1, 0]]
    rois = torch.cat([batch.slot[index, None].float(), scaled], 1)
    member = batch.group[index]
    out = torch.zeros(len(rois), 3, size, size)
    for g, pixels in enumerate(batch.groups):
        rows = (member == g).nonzero()[:, 0]
        out[rows] = roi_align(pixels.contiguous(), rois[rows], output_size=(size, size), spatial_scale=1.0,
                              sampling_ratio=-1, aligned=True)
    return out


def raw_crops(batch, index, boxes, size: int) -> torch.Tensor:
    """cut_crops' crops before normalisation (mean 0, std 1/255 undoes nothing)."""
    plain = Preprocess(image_size=size, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    return cut_crops(batch, index, boxes, plain, torch.float32)


def test_cpu_crops_are_torchvisions_roi_align_crops():
    """The separable CPU crops against torchvision's kernel: the engine's random boxes, boxes on
    every border, crops smaller than the output (upsampled), larger than twice it (3 samples an
    axis), boxes past the image (roi_align's zeros), fractional corners, and a padded batch."""
    photos = [data.astronaut()[:, :60], data.coffee(), data.rocket(), data.astronaut()]  # the first: its own group
    batch = pad_batch(photos, [p.shape[:2] for p in photos], CPU)
    assert len(batch.groups) == 2
    boxes, index = [], []
    for i, photo in enumerate(photos):
        h, w = photo.shape[:2]
        sampled = sample_boxes(0, f"photo-{i}", h, w, 30, 0.5, 0.9)
        side = min(h, w)
        special = [(0, 0, w, h), (0, 0, side, side), (w - side, h - side, w, h), (10.25, 3.5, 60.75, 40.1),
                   (w / 3, h / 4, w / 3 + 7, h / 4 + 5), (-20, -30, side / 2, side / 2), (w - 40, h - 30, w + 25, h + 18)]
        boxes += [*sampled.tolist(), *special]
        index += [i] * (len(sampled) + len(special))
    boxes, index = torch.tensor(boxes, dtype=torch.float64), torch.tensor(index)
    for size in (224, 32):  # 32: crops of over 64 px take 3 or more samples an axis
        ours = raw_crops(batch, index, boxes, size)
        theirs = roi_align_reference(batch, index, boxes, size)
        assert (ours - theirs).abs().max().item() < 1e-3  # grey levels of 0..255
        assert theirs.std().item() > 30  # real pictures, not zeros


def test_cpu_crops_do_not_depend_on_the_thread_count():
    pixels = [data.astronaut(), data.coffee()]
    batch = pad_batch(pixels, [p.shape[:2] for p in pixels], CPU)
    rng = np.random.default_rng(5)
    sides = rng.uniform(150, 400, size=23)
    boxes = torch.tensor(np.stack([rng.uniform(0, 100, 23), rng.uniform(0, 100, 23)], 1).repeat(2, 1)
                         + np.stack([np.zeros(23), np.zeros(23), sides, sides], 1))
    index = torch.tensor(rng.integers(0, 2, 23))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = raw_crops(batch, index, boxes, 224)
        torch.set_num_threads(3)
        split = raw_crops(batch, index, boxes, 224)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, split)
