"""Tests of pipeline.model.tags: a tag's weights found in the local cache without the network, and a
download that cannot happen refused at once with what to pass instead."""
from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import open_clip
import pytest

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.loading import check_weights
from pipeline.model.tags import TagSource, cached_tag_file, fetch_tag_weights
from tests.support import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, filename: str, payload: bytes = b"weights") -> Path:
    """A Hugging Face Hub cache (its documented layout) holding one file of ``repo_id`` at main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(payload)
    return snapshot


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub's address is a closed port on loopback: any request fails at once, as without internet."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")


def test_the_source_is_open_clips_hub_file_with_safetensors_tried_first():
    source = TagSource.of("ViT-B-32", "openai")
    hub = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"]
    assert source.repo_id == os.path.split(hub)[0] and source.repo_id.startswith("timm/")
    assert source.files == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def test_a_cached_tag_is_found_without_any_request(tmp_path, monkeypatch):
    source = TagSource.of("ViT-B-32", "openai")
    cached = hub_cache(tmp_path, source.repo_id, "open_clip_pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata",
                        lambda *a, **k: pytest.fail("the network was asked although the cache holds the file"))
    assert fetch_tag_weights("ViT-B-32", "openai", str(tmp_path)) == cached
    assert check_weights(ModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))) == "ViT-B-32"


def test_the_safetensors_file_wins_when_both_are_cached(tmp_path):
    source = TagSource.of("ViT-B-32", "openai")
    hub_cache(tmp_path / "a", source.repo_id, "open_clip_pytorch_model.bin")
    safe = hub_cache(tmp_path / "b", source.repo_id, "open_clip_model.safetensors")
    assert cached_tag_file(source, str(tmp_path / "b")) == safe
    assert cached_tag_file(source, str(tmp_path / "empty")) is None


def test_a_url_tag_is_found_in_open_clips_url_cache(tmp_path):
    source = TagSource("", (), "https://example.com/models/RN50-quickgelu.pt")
    assert cached_tag_file(source, str(tmp_path)) is None
    (tmp_path / "RN50-quickgelu.pt").write_bytes(b"weights")
    assert cached_tag_file(source, str(tmp_path)) == tmp_path / "RN50-quickgelu.pt"


def test_a_tag_that_cannot_be_downloaded_is_refused_with_what_to_pass_instead(tmp_path, no_hub, monkeypatch):
    calls = []
    download = open_clip.download_pretrained
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: calls.append(a) or download(*a, **k))
    with pytest.raises(ConfigError) as info:
        check_weights(ModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path)))
    message = str(info.value)
    assert message.startswith("pretrained: the weights of tag 'openai' for ViT-B-32 are not in the local cache")
    assert "ConnectError" in message and "huggingface.co/timm/" in message
    for instead in ("--model ViT-B-32-quickgelu --pretrained ./ViT-B-32-openai.safetensors", "--pretrained s3://",
                    "--pretrained none"):
        assert instead in message
    assert calls == []  # the one probe failed: open_clip's retrying download never started
    assert not any(tmp_path.rglob("*.bin")) and not any(tmp_path.rglob("*.safetensors"))


def test_a_file_of_a_quickgelu_tag_is_loaded_into_the_quickgelu_model():
    from pipeline.model.tags import _file_flags

    assert _file_flags("ViT-B-32", "openai") == "--model ViT-B-32-quickgelu --pretrained ./ViT-B-32-openai.safetensors"
    laion = next(tag for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32")
                 if not open_clip.get_pretrained_cfg("ViT-B-32", tag).get("quick_gelu"))
    assert _file_flags("ViT-B-32", laion) == f"--pretrained ./ViT-B-32-{laion}.safetensors"
