"""Tests of pipeline.model.loading with the tiny builtin model, real checkpoints and a local S3 server."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, StorageConfig
from pipeline.method.crops import Preprocess
from pipeline.model.checkpoints import checkpoint_cache_path
from pipeline.model.loading import (BUILTIN_CONFIG_DIR, INIT_FUNCTIONS, RandomWeightsWarning, check_weights,
                                    load_model, model_input_size, register_builtin_configs, resolve_device,
                                    resolve_model_name)
from pipeline.storage import file_version, filesystem
from tests.support import s3_client

TINY = "lgca-tiny"
TINY_JSON = BUILTIN_CONFIG_DIR / f"{TINY}.json"


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class S3Bucket:
    client: object  # boto3 S3 client bound to the local server
    name: str
    storage: StorageConfig  # how to reach the local server


def tiny_config(tmp_path: Path, **overrides: str) -> ModelConfig:
    """A ModelConfig for lgca-tiny on the CPU with its cache under tmp_path."""
    fields = {"name": TINY, "pretrained": "none", "device": "cpu", "cache_dir": str(tmp_path / "cache")}
    fields.update(overrides)
    return ModelConfig(**fields)


def assert_same_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key


def other_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Different values of the same shapes: saved, the same number of bytes, as a retrained checkpoint."""
    return {key: value + 1 for key, value in state_dict.items()}


def fixed_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return images, tokenizer(["a photo of a cat", "a dog", "x", ""])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Checkpoint:
    """A random-weight lgca-tiny state_dict saved with torch.save."""
    register_builtin_configs()
    torch.manual_seed(123)
    state_dict = {k: v.clone() for k, v in open_clip.create_model(TINY).state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(state_dict, path)
    return Checkpoint(path=path, state_dict=state_dict)


@pytest.fixture
def s3_bucket(moto_endpoint, bucket) -> S3Bucket:
    """The fresh bucket of the shared loopback S3 server, with a client and fsspec options."""
    client, name = s3_client(moto_endpoint), bucket
    return S3Bucket(client=client, name=name, storage=StorageConfig(endpoint_url=moto_endpoint))


def test_tiny_model_with_random_weights(tmp_path):
    with pytest.warns(UserWarning, match="meaningless"):
        loaded = load_model(tiny_config(tmp_path))
    config = json.loads(TINY_JSON.read_text())
    own = open_clip.get_model_preprocess_cfg(loaded.model)
    assert loaded.name == TINY and loaded.pretrained == "none" and loaded.checkpoint_sha256 is None
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.preprocess == Preprocess(
        image_size=config["vision_cfg"]["image_size"], mean=tuple(own["mean"]), std=tuple(own["std"]),
        interpolation=own["interpolation"], resize_mode=own["resize_mode"])
    assert tuple(own["size"]) == (64, 64) and model_input_size(TINY) == 64
    images, tokens = fixed_inputs(loaded.tokenizer)
    assert tokens.shape == (4, config["text_cfg"]["context_length"])
    with torch.no_grad():
        assert loaded.model.encode_image(images).shape == (4, config["embed_dim"])
        assert loaded.model.encode_text(tokens).shape == (4, config["embed_dim"])


def test_no_hugging_face_text_weights_are_fetched_for_a_checkpoint_or_none(tmp_path, checkpoint, monkeypatch):
    """open_clip loads a Hugging Face text tower's own weights unless told not to: a download
    the checkpoint overwrites, or, with 'none', weights that are not random."""
    seen = []
    create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: seen.append(kw) or create(*a, **kw))
    load_model(tiny_config(tmp_path, pretrained=str(checkpoint.path)))
    with pytest.warns(UserWarning, match="meaningless"):
        load_model(tiny_config(tmp_path))
    assert [kw["pretrained_text"] for kw in seen] == [False, False]


def test_local_checkpoint_loads_exact_weights(tmp_path, checkpoint):
    loaded = load_model(tiny_config(tmp_path, pretrained=str(checkpoint.path)))
    assert_same_weights(loaded.model, checkpoint.state_dict)
    assert loaded.checkpoint_sha256 == hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()
    reference = open_clip.create_model(TINY).eval()
    reference.load_state_dict(checkpoint.state_dict)
    images, tokens = fixed_inputs(loaded.tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images))
        assert torch.equal(loaded.model.encode_text(tokens), reference.encode_text(tokens))


@pytest.fixture
def init_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of torch.nn.init's initialisers (those INIT_FUNCTIONS name)."""
    calls = dict.fromkeys(INIT_FUNCTIONS, 0)

    def counting(name, function):
        def count(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return count

    for name in INIT_FUNCTIONS:
        monkeypatch.setattr(torch.nn.init, name, counting(name, getattr(torch.nn.init, name)))
    return calls


def test_checkpoint_load_skips_random_init(tmp_path, checkpoint, init_calls, caplog):
    with pytest.warns(UserWarning, match="meaningless"):
        load_model(tiny_config(tmp_path))
    assert init_calls["normal_"] > 0 and init_calls["kaiming_uniform_"] > 0  # random weights are drawn
    before, caplog.records[:] = dict(init_calls), []
    loaded = load_model(tiny_config(tmp_path, pretrained=str(checkpoint.path)))
    assert init_calls == before  # no nn.init initialiser ran only to be overwritten
    assert_same_weights(loaded.model, checkpoint.state_dict)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]  # open_clip's, wrong here
    torch.nn.init.normal_(torch.empty(3))  # the initialisers are back
    assert init_calls["normal_"] == before["normal_"] + 1


def test_checkpoint_lacking_a_tensor_is_refused(tmp_path, checkpoint, init_calls):
    partial = dict(checkpoint.state_dict)
    del partial["visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    with pytest.raises(ConfigError, match=r"(?s)does not fit model 'lgca-tiny'.*Missing key.*visual\.proj"):
        load_model(tiny_config(tmp_path, pretrained=str(path)))  # never a model with an uninitialised weight
    torch.nn.init.normal_(torch.empty(3))  # restored after the failure too
    assert init_calls["normal_"] == 1


def test_only_strict_loads_skip_random_init():
    from pipeline.model.loading import _Weights

    assert _Weights(tag="openai", checkpoint=None).strict
    assert _Weights(tag=None, checkpoint=Path("model.pt")).strict
    assert not _Weights(tag=None, checkpoint=Path("siglip.NPZ")).strict  # big_vision files: tensor by tensor
    assert not _Weights(tag=None, checkpoint=None).strict  # random weights are the weights


def test_wrapped_state_dict_in_bf16(tmp_path, checkpoint):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": checkpoint.state_dict, "epoch": 3}, path)
    loaded = load_model(tiny_config(tmp_path, pretrained=str(path), precision="bf16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert_same_weights(loaded.model, {k: v.to(torch.bfloat16) for k, v in checkpoint.state_dict.items()})
    images, _ = fixed_inputs(loaded.tokenizer)
    with torch.no_grad():
        assert loaded.model.encode_image(images.to(torch.bfloat16)).dtype == torch.bfloat16


def test_config_json_path_as_name(tmp_path, checkpoint):
    path = tmp_path / "my-model.json"
    shutil.copy(TINY_JSON, path)
    assert resolve_model_name(str(path)) == "my-model"
    assert model_input_size(str(path)) == 64
    loaded = load_model(tiny_config(tmp_path, name=str(path), pretrained=str(checkpoint.path)))
    assert loaded.name == "my-model"
    assert_same_weights(loaded.model, checkpoint.state_dict)


def test_config_json_cannot_redefine_a_registered_model(tmp_path):
    config = json.loads(TINY_JSON.read_text())
    config["embed_dim"] = 32
    path = tmp_path / f"{TINY}.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="different architecture"):
        resolve_model_name(str(path))
    with pytest.raises(ConfigError, match="not found"):
        resolve_model_name(str(tmp_path / "absent.json"))


def test_open_clip_names_resolve():
    assert resolve_model_name("ViT-B/32") == "ViT-B-32"
    assert model_input_size("ViT-B-32") == open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"]


def test_unknown_model_offers_a_short_did_you_mean_not_every_name():
    with pytest.raises(ConfigError, match="not found") as info:
        resolve_model_name("lgca-tiney")
    message = str(info.value)
    assert "did you mean lgca-tiny?" in message
    assert f"open_clip knows {len(open_clip.list_models())} models" in message
    assert "open_clip.list_models()" in message  # how to see them all, instead of all of them
    assert "ViT-B-32" not in message and len(message) < 300
    with pytest.raises(ConfigError) as info:
        resolve_model_name("ViT-B-33")
    close = str(info.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert "ViT-B-32" in close and 1 <= len(close) <= 5


def test_random_weights_are_seeded_the_same_in_every_load(tmp_path):
    torch.manual_seed(1)
    with pytest.warns(RandomWeightsWarning, match="seed 0"):
        first = load_model(tiny_config(tmp_path)).model.state_dict()
    after_first = torch.rand(1)
    torch.manual_seed(2)
    with pytest.warns(RandomWeightsWarning):
        second = load_model(tiny_config(tmp_path)).model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)  # the caller's random state is left as it was


def test_random_weights_are_announced_once(tmp_path, caplog):
    with pytest.warns(RandomWeightsWarning) as warned:
        load_model(tiny_config(tmp_path))
    assert len(warned) == 1
    assert "No pretrained weights loaded" not in caplog.text  # open_clip's own line would say it again


def test_s3_checkpoint_is_fetched_once(tmp_path, checkpoint, s3_bucket):
    s3_bucket.client.upload_file(str(checkpoint.path), s3_bucket.name, "models/tiny.pt")
    uri = f"s3://{s3_bucket.name}/models/tiny.pt"
    config = tiny_config(tmp_path, pretrained=uri)
    loaded = load_model(config, s3_bucket.storage)
    assert_same_weights(loaded.model, checkpoint.state_dict)
    etag = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="models/tiny.pt")["ETag"]
    version = file_version(filesystem(uri, s3_bucket.storage)[0].info(uri))
    assert version == f"{checkpoint.path.stat().st_size}:{etag}"
    cached = checkpoint_cache_path(uri, config.cache_dir, version)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert cached.parent.parent == Path(config.cache_dir) / "checkpoints" / digest and cached.name == "tiny.pt"
    assert loaded.checkpoint == cached and cached.read_bytes() == checkpoint.path.read_bytes()
    assert loaded.checkpoint_sha256 == hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()
    before = cached.stat()
    again = load_model(config, s3_bucket.storage)
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.checkpoint_sha256 == loaded.checkpoint_sha256
    assert sorted(p.name for p in cached.parent.iterdir()) == ["tiny.pt"]


def test_s3_checkpoint_replaced_with_same_size_is_fetched_again(tmp_path, checkpoint, s3_bucket):
    s3_bucket.client.upload_file(str(checkpoint.path), s3_bucket.name, "tiny.pt")
    uri = f"s3://{s3_bucket.name}/tiny.pt"
    config = tiny_config(tmp_path, pretrained=uri)
    first = load_model(config, s3_bucket.storage)
    retrained = other_weights(checkpoint.state_dict)
    path = tmp_path / "retrained" / "tiny.pt"  # torch.save records the name: the same one, the same size
    path.parent.mkdir()
    torch.save(retrained, path)
    assert path.stat().st_size == checkpoint.path.stat().st_size
    s3_bucket.client.upload_file(str(path), s3_bucket.name, "tiny.pt")  # a new ETag, maybe the same second
    second = load_model(config, s3_bucket.storage)
    assert_same_weights(second.model, retrained)
    assert second.checkpoint != first.checkpoint and not first.checkpoint.parent.exists()  # the old copy is gone
    assert [p.name for p in second.checkpoint.parent.parent.iterdir()] == [second.checkpoint.parent.name]


def test_file_uri_checkpoint_replaced_with_same_size_is_fetched_again(tmp_path, checkpoint):
    path = tmp_path / "remote" / "tiny.pt"
    path.parent.mkdir()
    shutil.copy(checkpoint.path, path)
    config = tiny_config(tmp_path, pretrained=f"file://{path}")
    assert_same_weights(load_model(config).model, checkpoint.state_dict)
    retrained = other_weights(checkpoint.state_dict)
    mtime = path.stat().st_mtime_ns
    torch.save(retrained, path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later write, however coarse the clock
    assert path.stat().st_size == checkpoint.path.stat().st_size
    loaded = load_model(config)
    assert_same_weights(loaded.model, retrained)
    assert loaded.checkpoint.read_bytes() == path.read_bytes()


def test_a_safetensors_checkpoint_is_checked_on_the_driver_and_loaded(tmp_path, checkpoint):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(checkpoint.state_dict, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one warning per tensor from the meta-device check
        assert check_weights(tiny_config(tmp_path, pretrained=str(path))) == TINY
    assert_same_weights(load_model(tiny_config(tmp_path, pretrained=str(path))).model, checkpoint.state_dict)
    with pytest.raises(ConfigError, match="does not fit model 'ViT-B-32'"):
        check_weights(ModelConfig(name="ViT-B-32", pretrained=str(path), device="cpu"))


def test_missing_local_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(ConfigError, match="not found") as info:
        load_model(tiny_config(tmp_path, pretrained=str(missing)))
    assert str(missing) in str(info.value)


def test_pickled_objects_are_refused(tmp_path, checkpoint):
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": checkpoint.state_dict, "extra": NotATensor()}, path)
    with pytest.raises(ConfigError, match="weights_only") as info:
        load_model(tiny_config(tmp_path, pretrained=str(path)))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(ConfigError, match="does not fit model 'lgca-tiny'"):
        load_model(tiny_config(tmp_path, pretrained=str(path)))


def test_driver_check_refuses_a_checkpoint_of_another_architecture(tmp_path, checkpoint):
    config = json.loads(TINY_JSON.read_text())
    patch8 = open_clip.create_model(TINY, vision_cfg={**config["vision_cfg"], "patch_size": 8})
    path = tmp_path / "patch8.pt"
    torch.save(patch8.state_dict(), path)
    message = r"(?s)does not fit model 'lgca-tiny'.*size mismatch for visual\.conv1\.weight.*\[128, 3, 8, 8\]"
    with pytest.raises(ConfigError, match=message):
        check_weights(tiny_config(tmp_path, pretrained=str(path)))
    with pytest.raises(ConfigError, match=message):  # the actor's error, on the driver
        load_model(tiny_config(tmp_path, pretrained=str(path)))
    partial = dict(checkpoint.state_dict)
    del partial["visual.proj"]
    torch.save({"state_dict": partial}, path)
    with pytest.raises(ConfigError, match=r"(?s)Missing key.*visual\.proj"):
        check_weights(tiny_config(tmp_path, pretrained=str(path)))
    torch.save({"positional_embedding": torch.zeros(77, 32)}, path)
    with pytest.raises(ConfigError, match=r"positional embedding cannot be resized .*text pos_embed width"):
        check_weights(tiny_config(tmp_path, pretrained=str(path)))
    torch.save({"state_dict": checkpoint.state_dict}, path)
    assert check_weights(tiny_config(tmp_path, pretrained=str(path))) == TINY


def openai_style_archive(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Save lgca-tiny with ``state_dict`` as OpenAI's original files are: a TorchScript archive
    whose state_dict holds the parameters only (the attention mask is a plain attribute)."""
    model = open_clip.create_model(TINY).eval()
    model.load_state_dict(state_dict)
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    torch.jit.save(torch.jit.script(model), path)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_torchscript_archive_is_refused_with_what_to_do(tmp_path, checkpoint):
    fp16_values = {key: value.half().float() for key, value in checkpoint.state_dict.items()}  # as OpenAI's
    path = tmp_path / "ViT-tiny.pt"
    openai_style_archive(path, fp16_values)
    config = tiny_config(tmp_path, pretrained=str(path))
    message = r"is a TorchScript archive \(OpenAI's original CLIP format\).*pretrained tag 'openai'"
    with pytest.raises(ConfigError, match=message):
        check_weights(config)
    with pytest.raises(ConfigError, match=message) as info:
        load_model(config)
    assert f"open_clip.load_openai_model('{path}', device='cpu').state_dict()" in str(info.value)
    converted = tmp_path / "state_dict.pt"
    torch.save(open_clip.load_openai_model(str(path), device="cpu").state_dict(), converted)  # the advice
    loaded = load_model(tiny_config(tmp_path, pretrained=str(converted)))
    assert_same_weights(loaded.model, fp16_values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_errors(tmp_path):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="use fp32 or bf16"):
        load_model(tiny_config(tmp_path, device="auto", precision="fp16"))
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model(tiny_config(tmp_path, device="cuda:0"))


def test_preprocess_rejects_letterbox():
    with pytest.raises(ConfigError, match="resize_mode 'longest' is not supported; available: shortest, squash"):
        Preprocess(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   interpolation="bicubic", resize_mode="longest")
