"""open_clip pretrained tags: their weights found in the local cache, or downloaded, or refused fast.

A tag (``--pretrained openai``) names weights that open_clip downloads from the Hugging Face
Hub (or, for a few, from a URL) into a local cache. :func:`fetch_tag_weights` does that on
the driver before anything else of a run: a cached file is found without any network
request; otherwise one request with a short timeout and no retries tells whether the host
answers at all, and only then is the file downloaded. Without it, open_clip's download
retries for about a minute per file in every model actor, and the run fails there, after
Ray has started. open_clip then loads the tag from the same cache.
"""
from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import open_clip

from pipeline.config import ConfigError

PROBE_SECONDS = 10  # how long the one request that tells whether the weights' host answers may take
HF_DEFAULT_FILE = "open_clip_pytorch_model.bin"  # open_clip's file name where a hub id names none
URL_CACHE = "~/.cache/clip"  # open_clip's cache for URL downloads when no cache_dir is given


@dataclass(frozen=True)
class TagSource:
    """Where open_clip gets a tag's weights: a Hugging Face Hub file, or else a URL."""

    repo_id: str  # Hugging Face Hub repository, '' for a URL download
    files: tuple[str, ...]  # file names open_clip tries in its order (safetensors first)
    url: str  # the download URL when there is no hub repository

    @classmethod
    def of(cls, name: str, tag: str) -> TagSource:
        """The source open_clip's ``download_pretrained`` uses for tag ``tag`` of model ``name``."""
        cfg = open_clip.get_pretrained_cfg(name, tag)
        hub = cfg.get("hf_hub", "")
        if hub and open_clip.pretrained.has_hf_hub():
            repo_id, filename = os.path.split(hub)
            filename = filename or HF_DEFAULT_FILE
            return cls(repo_id, (*_safetensors_first(filename), filename), "")
        return cls("", (), cfg.get("url", ""))

    def describe(self) -> str:
        return f"huggingface.co/{self.repo_id}" if self.repo_id else self.url


def _safetensors_first(filename: str) -> tuple[str, ...]:
    """The .safetensors names open_clip tries before ``filename`` (as its ``_get_safe_alternatives``)."""
    if filename == HF_DEFAULT_FILE:
        return ("open_clip_model.safetensors",)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors",)
    return ()


def cached_tag_file(source: TagSource, cache_dir: str) -> Path | None:
    """The tag's weights file when the local cache holds it; no network request is made."""
    if source.repo_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in source.files:
            found = try_to_load_from_cache(source.repo_id, filename, cache_dir=cache_dir or None)
            if isinstance(found, str):  # else None (not cached) or a marker that the hub has no such file
                return Path(found)
        return None
    target = Path(cache_dir or URL_CACHE).expanduser() / os.path.basename(source.url)
    return target if target.is_file() else None


def probe(source: TagSource) -> None:
    """One request to the weights' host, PROBE_SECONDS at most and not retried; raises if it fails."""
    if source.repo_id:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(source.repo_id, source.files[-1]), timeout=PROBE_SECONDS)
        return
    with urllib.request.urlopen(urllib.request.Request(source.url, method="HEAD"), timeout=PROBE_SECONDS):
        pass


def fetch_tag_weights(name: str, tag: str, cache_dir: str = "") -> Path:
    """The local file of tag ``tag`` of open_clip model ``name``: from the cache, else downloaded.

    Raises ConfigError, within about PROBE_SECONDS when the host cannot be reached, saying what
    to pass instead. ``cache_dir`` is ModelConfig.cache_dir ('' = open_clip's own caches).
    """
    source = TagSource.of(name, tag)
    cached = cached_tag_file(source, cache_dir)
    if cached is not None:
        return cached
    try:
        probe(source)
        return Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag), cache_dir=cache_dir or None))
    except Exception as err:  # DNS, refused, timeout, HTTP status, offline mode: all mean "not downloadable now"
        raise ConfigError(
            f"pretrained: the weights of tag {tag!r} for {name} are not in the local cache and could not be "
            f"downloaded from {source.describe()} ({type(err).__name__}: {_first_line(err)}); without internet "
            f"give a checkpoint file ({_file_flags(name, tag)}), a URI (--pretrained s3://bucket/{name}.pt), or "
            "--pretrained none for random weights (labels that mean nothing, to try the pipeline)") from err


def _file_flags(name: str, tag: str) -> str:
    """The flags that load tag ``tag``'s weights from a file: a tag of a QuickGELU model (OpenAI's)
    sets the activation itself, a file needs the model's ``-quickgelu`` variant."""
    quick = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu") and not name.endswith("-quickgelu")
    model = f"--model {name}-quickgelu " if quick and open_clip.get_model_config(f"{name}-quickgelu") else ""
    return f"{model}--pretrained ./{name}-{tag}.safetensors"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "no message"
