"""Models of the paper's shapes with random weights (for speed runs where checkpoints cannot
be fetched): seeded, so the same shape gives the same model and the same tokens."""

from __future__ import annotations

import pytest
import torch

from parrot.cli import main
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.random_weights import SHAPES, random_model
from parrot.errors import UserError

from conftest import greedy, run


def test_shapes_have_the_papers_parameter_counts() -> None:
    # counted from the shapes alone (LLaMA-7B: 6.7e9 with its 32,000-token vocabulary)
    for name, billions in (("llama-7b", 6.7), ("llama-13b", 13.0)):
        s = SHAPES[name]
        per_layer = 4 * s.hidden_size**2 + 3 * s.hidden_size * s.intermediate_size
        total = s.num_layers * per_layer + 2 * 32_000 * s.hidden_size
        assert total / 1e9 == pytest.approx(billions, rel=0.02)


def test_a_random_model_is_seeded_and_well_formed() -> None:
    config, state = random_model("tiny", 100, (2,), torch.float32, seed=3)
    again = random_model("tiny", 100, (2,), torch.float32, seed=3)[1]
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (config.num_kv_heads * config.head_dim, config.hidden_size)
    assert not torch.equal(state["model.embed_tokens.weight"], random_model("tiny", 100, (2,), torch.float32, seed=4)[1]["model.embed_tokens.weight"])


def test_an_engine_with_random_weights_generates_the_same_tokens_twice() -> None:
    config = EngineConfig(kv_memory_gb=0.05, random_weights="tiny", shared_prefix_attention=False)
    first, second = LLMEngine(config), LLMEngine(config)
    assert first.model_config.hidden_size == SHAPES["tiny"].hidden_size
    outputs = [run(engine.complete("Write python code of a snake game.", greedy(8, ignore_eos=True))) for engine in (first, second)]
    assert outputs[0] == outputs[1]
    assert first.stats().tokens_processed > 8


def test_random_weights_are_refused_without_a_known_shape(capsys) -> None:
    with pytest.raises(UserError, match="unknown model shape 'llama-70b'"):
        EngineConfig(random_weights="llama-70b")
    assert main(["generate", "hi", "--random-weights"]) == 2
    assert "--random-weights and --config go together" in capsys.readouterr().err


def test_a_directory_of_tokenizer_and_config_serves_random_weights_only(tmp_path, model_dir, capsys) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    engine = LLMEngine(EngineConfig(model=str(tmp_path), kv_memory_gb=0.05, random_weights="tiny"))
    assert run(engine.complete("Hello", greedy(3)))
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    assert "has no *.safetensors file" in capsys.readouterr().err
