"""Model configuration, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parrot.errors import ModelNotFoundError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; kind is one of default, linear, llama3."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ModelNotFoundError(f"unsupported rope scaling type {self.kind!r} (supported: default, linear, llama3)")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelNotFoundError(
                f"model type {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelNotFoundError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "ModelConfig":
        rope_raw = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope_raw.get("rope_theta", 10000.0))
        kind = rope_raw.get("rope_type", rope_raw.get("type", "default"))
        rope = RopeScaling(
            kind=kind,
            factor=float(rope_raw.get("factor", 1.0)),
            low_freq_factor=float(rope_raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_raw.get("original_max_position_embeddings", 8192)),
        )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        num_heads = raw["num_attention_heads"]
        model_type = raw.get("model_type", "llama")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", model_type == "qwen2"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=rope,
        )
