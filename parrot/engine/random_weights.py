"""Models of the paper's shapes with random weights, for speed measurements.

The real LLaMA checkpoints cannot be fetched here, and the time of a forward step does
not depend on the weights' values, only on their shapes. `--random-weights --config
llama-7b` builds such a model: the shape of LLaMA-7B, weights drawn from a seeded
generator (the same seed gives the same model), and the default model's tokenizer.
Its vocabulary is that tokenizer's, so every token id is valid. For LLaMA-7B that is
49,152 entries instead of 32,000, which makes the model about 1.5 % larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.config import ModelConfig
from parrot.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int


# contexts of 8192 tokens (LLaMA-2 has 4096): the paper's GPTs prompts reach 7.4k tokens, and a
# step's speed does not depend on the limit
SHAPES: dict[str, ModelShape] = {
    "llama-7b": ModelShape(4096, 11008, 32, 32, 32, 8192),
    "llama-13b": ModelShape(5120, 13824, 40, 40, 40, 8192),
    "tiny": ModelShape(64, 128, 2, 4, 2, 2048),  # for tests: a forward step in microseconds
}
INIT_STD = 0.02  # the usual LLaMA initializer range


def shape_named(name: str) -> ModelShape:
    if name not in SHAPES:
        raise UserError(f"unknown model shape {name!r} for --random-weights; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def shape_config(name: str, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
    """The model config of the named shape (LLaMA's layout: untied embeddings, no biases)."""
    shape = shape_named(name)
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False, attention_bias=False,
        eos_token_ids=eos_token_ids,
    )


def random_model(name: str, vocab_size: int, eos_token_ids: tuple[int, ...], dtype: torch.dtype,
                 seed: int = 0, device: torch.device | str = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and a state dict (Hugging Face names) of a random model of the named shape, drawn
    on device (a 7B model takes a minute to draw on a CPU, a second on a GPU). One seed gives one
    model per device type; a CPU copy of a GPU draw is how the GPU path is checked against the CPU's."""
    config = shape_config(name, vocab_size, eos_token_ids)
    generator = torch.Generator(device=device).manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator, device=device) * INIT_STD).to(dtype)  # [out, in]

    hidden, kv, inter = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size
    state = {
        "model.embed_tokens.weight": weight(vocab_size, hidden),
        "lm_head.weight": weight(vocab_size, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=dtype, device=device),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype, device=device),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype, device=device),
            p + "self_attn.q_proj.weight": weight(hidden, hidden),
            p + "self_attn.k_proj.weight": weight(kv, hidden),
            p + "self_attn.v_proj.weight": weight(kv, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, hidden),
            p + "mlp.gate_proj.weight": weight(inter, hidden),
            p + "mlp.up_proj.weight": weight(inter, hidden),
            p + "mlp.down_proj.weight": weight(hidden, inter),
        }
    return config, state
