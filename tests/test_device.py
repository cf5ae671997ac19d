"""Choosing the device and sizing the KV pool from its memory; the GPU engine checked against the
CPU engine (tests marked gpu, skipped without CUDA)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from parrot.cli import main
from parrot.engine.attention import CpuPagedAttention
from parrot.engine.device import (
    ALL_ROWS, SMALL_BATCH_ROWS, DeviceMemory, bf16_matmul_rows, default_dtype, kv_cache_dtype, kv_pool_bytes, prompt_attention_dtype,
    resolve_device, step_activation_bytes,
)
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.loader import DEFAULT_MODEL
from parrot.engine.model import LlamaModel
from parrot.engine.model_runner import KVCacheTensors, prompt_logits
from parrot.engine.random_weights import random_model
from parrot.engine.penalties import TokenCounts, apply_penalties
from parrot.engine.sampler import SamplingParams, apply_token_rules
from parrot.engine.structured import StructuredOutput, StructureKind
from parrot.errors import UserError

from conftest import PROMPTS, fill_and_generate, greedy, run, text_of, token_ids

GIB = 2**30
# the GPU machine has no model package: the GPU suite points this at a directory of its tokenizer and config
TOKENIZER_MODEL = os.environ.get("PARROT_TEST_MODEL", DEFAULT_MODEL)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_pool_takes_the_engines_share_of_the_gpu_less_weights_and_activations():
    gpu = torch.device("cuda")
    alone = DeviceMemory(free_bytes=59 * GIB, total_bytes=80 * GIB, own_bytes=20 * GIB)  # 20 GiB of weights
    assert kv_pool_bytes(gpu, None, 0.9, 2 * GIB, alone) == int(80 * GIB * 0.9) - 20 * GIB - 2 * GIB
    assert kv_pool_bytes(gpu, 3.0, 0.9, 2 * GIB, alone) == 3 * GIB  # an explicit size wins
    assert kv_pool_bytes(torch.device("cpu"), None, 0.9, 2 * GIB) == GIB  # the CPU default
    # two engines on one GPU with 0.45 each: the second sizes like the first, from its own use
    first = kv_pool_bytes(gpu, None, 0.45, 2 * GIB, DeviceMemory(59 * GIB, 80 * GIB, 20 * GIB))
    second = kv_pool_bytes(gpu, None, 0.45, 2 * GIB, DeviceMemory(59 * GIB - 20 * GIB - first, 80 * GIB, 20 * GIB))
    assert first == second == int(80 * GIB * 0.45) - 22 * GIB
    # never more than is free, whatever the share says
    assert kv_pool_bytes(gpu, None, 0.9, 2 * GIB, DeviceMemory(10 * GIB, 80 * GIB, 20 * GIB)) == 8 * GIB
    with pytest.raises(UserError, match="no GPU memory left for the KV cache.*--gpu-memory-utilization"):
        kv_pool_bytes(gpu, None, 0.25, 2 * GIB, alone)


def test_activation_reserve_grows_with_the_step_the_vocabulary_and_the_attention_parts():
    config, _ = random_model("tiny", 1000, (2,), torch.float32)
    small = step_activation_bytes(config, 128, 8, torch.bfloat16)
    assert step_activation_bytes(config, 512, 8, torch.bfloat16) > small
    assert step_activation_bytes(config, 128, 64, torch.bfloat16) > small
    # a static decode bucket's float32 attention parts: out and log-sum-exp per head, three copies, twice
    parts = step_activation_bytes(config, 128, 8, torch.bfloat16, attention_part_rows=100) - small
    assert parts == 2 * 3 * 4 * 100 * config.num_heads * (config.head_dim + 1)
    kept = step_activation_bytes(config, 128, 8, torch.bfloat16, kept_logits_rows=10) - small
    assert kept == 4 * 10 * config.vocab_size  # captured graphs' float32 logits stay allocated
    assert default_dtype(torch.device("cuda")) == torch.bfloat16 and default_dtype(torch.device("cpu")) == torch.float32
    assert EngineConfig(device="cuda").torch_dtype == torch.bfloat16 and EngineConfig().torch_dtype == torch.float32


def test_bad_device_settings_are_refused_with_what_to_do(capsys):
    with pytest.raises(UserError, match="device must be one of cpu, cuda"):
        EngineConfig(device="tpu")
    with pytest.raises(UserError, match="gpu_memory_utilization must be in"):
        EngineConfig(gpu_memory_utilization=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda needs a CUDA GPU.*use --device cpu"):
            resolve_device("cuda")
        assert main(["generate", "hi", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert main(["serve", "--device", "cuda", "--engines", "1"]) == 2  # refused before any engine process starts
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@needs_cuda
def test_gpu_engine_matches_the_cpu_path_on_a_small_random_model():
    """The GPU engine's weights copied to a CPU model: float32 logits of every prompt position
    within tolerance, and the same greedy token wherever the top two are not a near-tie."""
    gpu = LLMEngine(EngineConfig(model=TOKENIZER_MODEL, random_weights="tiny", kv_memory_gb=0.05, dtype="float32", device="cuda"))
    config, state = random_model("tiny", gpu.model_config.vocab_size, gpu.model_config.eos_token_ids, torch.float32, device="cuda")
    cpu_model = LlamaModel(config, {k: v.cpu() for k, v in state.items()}, CpuPagedAttention(), torch.float32)
    assert torch.equal(cpu_model.embed, gpu.model.embed.cpu())  # the engine drew the same weights
    cpu_kv = KVCacheTensors(config, 64, gpu.config.block_size, torch.float32)
    for ids in (gpu.tokenizer.encode(p) for p in PROMPTS):
        expected = prompt_logits(cpu_model, cpu_kv, ids, torch.device("cpu"))
        got = prompt_logits(gpu.model, gpu.kv, ids, gpu.device).cpu()
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
        top2 = expected.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 4e-3
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_from_cuda_graphs_equals_eager_decode():
    # float32, so that the two paths' different batch shapes cannot flip a near-tie of the random model
    common = dict(model=TOKENIZER_MODEL, random_weights="tiny", kv_memory_gb=0.05, device="cuda", dtype="float32")
    graphs, eager = LLMEngine(EngineConfig(**common)), LLMEngine(EngineConfig(**common, decode_graphs=False))
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    replays_at_start = graphs.runner.graphs.replays  # the engine's own timing of a decode step
    outputs = [[run(e.complete(p, greedy(16))) for p in PROMPTS] for e in (graphs, eager)]
    assert outputs[0] == outputs[1]
    assert graphs.runner.graphs.replays > replays_at_start


@pytest.mark.gpu
@needs_cuda
def test_gpu_sampling_rules_act_on_the_decode_graphs_logits():
    """Penalties, logit_bias, allowed_token_ids, min_p, logprobs and structured output on the GPU,
    whose decode steps replay captured graphs: each token the engine chose is the best after the
    same rules applied to the model's own logits at that position (recomputed by a fresh prefill),
    and each reported logprob is the model's."""
    engine = LLMEngine(EngineConfig(model=TOKENIZER_MODEL, random_weights="tiny", kv_memory_gb=0.05, dtype="float32",
                                    device="cuda", prefix_caching=False))
    ids = engine.tokenizer.encode("one two three one two three one two three")
    out = run(engine.complete(ids, greedy(4)))
    first = engine.tokenizer.encode(out)[0] if out else 0

    def rows(output: list[int]) -> torch.Tensor:
        """[len(output), V]: the model's logits before each output token (no context is live now)."""
        return prompt_logits(engine.model, engine.kv, ids + output, engine.device)[len(ids) - 1 : -1].float().cpu()

    cases = [greedy(8, repetition_penalty=1.8), greedy(8, presence_penalty=1.5, frequency_penalty=0.7),
             greedy(6, logit_bias={first: -100.0, 7: 3.0}), greedy(6, allowed_token_ids=(5, 9, 11, first)),
             SamplingParams(max_tokens=6, temperature=1.7, seed=3, ignore_eos=True, min_p=1.0, logprobs=2)]
    for sampling in cases:
        tokens = run(fill_and_generate(engine, "rules", ids, sampling))
        output = token_ids(tokens)
        for row, (logits, token) in enumerate(zip(rows(output), output)):
            if sampling.logprobs is not None:
                assert tokens[row].logprobs.logprob == pytest.approx(torch.log_softmax(logits, -1)[token].item(), abs=1e-3)
            ruled = apply_penalties(apply_token_rules(logits, sampling).unsqueeze(0), [TokenCounts.of(ids, output[:row], len(logits))], [sampling])[0]
            assert ruled[token] >= ruled.max() - 1e-3, (sampling, row)
    forced = token_ids(run(fill_and_generate(engine, "forced", ids, greedy(4, logit_bias={42: 100.0}))))
    assert forced == [42] * 4
    structured = greedy(40, ignore_eos=False, structured=StructuredOutput(StructureKind.REGEX, "(yes|no)-[0-9]{3}"))
    assert re.fullmatch("(yes|no)-[0-9]{3}", text_of(run(fill_and_generate(engine, "structured", ids, structured))))


def test_serve_hands_engines_their_flags_and_a_split_of_the_gpu():
    from parrot.cli import build_parser, engine_config, engine_flags

    args = build_parser().parse_args(["serve", "--device", "cuda", "--gpu-memory-utilization", "0.8", "--no-cuda-graphs",
                                      "--random-weights", "--config", "tiny", "--kv-dtype", "bfloat16"])
    flags = engine_flags(args, engines_per_gpu=2)
    engine_args = build_parser().parse_args(["engine", "--manager", "http://m", *flags])
    config = engine_config(engine_args)
    assert (config.device, config.gpu_memory_utilization, config.decode_graphs, config.random_weights) == ("cuda", 0.4, False, "tiny")
    assert config.kv_memory_gb is None  # sized from the GPU unless given
    assert config.kv_dtype == "bfloat16"
    cpu_args = build_parser().parse_args(["serve", "--prompt-attention-dtype", "bfloat16"])
    cpu_engine_args = build_parser().parse_args(["engine", "--manager", "http://m", *engine_flags(cpu_args, engines_per_gpu=1)])
    assert engine_config(cpu_engine_args).prompt_attention_dtype == "bfloat16"


def test_cpu_matmuls_go_bf16_by_what_the_cpu_multiplies_natively():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert bf16_matmul_rows("auto", cpu, has_bf16_dot=True) == ALL_ROWS
    assert bf16_matmul_rows("auto", cpu, has_bf16_dot=False) == SMALL_BATCH_ROWS
    assert bf16_matmul_rows("all", cpu, has_bf16_dot=False) == ALL_ROWS
    assert bf16_matmul_rows("small-batches", cpu, has_bf16_dot=True) == SMALL_BATCH_ROWS
    assert bf16_matmul_rows("off", cpu, has_bf16_dot=True) == 0
    assert bf16_matmul_rows("auto", gpu, has_bf16_dot=True) == 0  # a GPU computes in its own dtype
    with pytest.raises(UserError, match="cpu_bf16 must be one of auto, off, small-batches, all"):
        EngineConfig(cpu_bf16="fast")


def test_the_engine_says_what_it_computes_in(caplog):
    f32, bf16 = torch.float32, torch.bfloat16
    assert kv_cache_dtype("auto", f32) == f32 and kv_cache_dtype("auto", bf16) == bf16  # the model's
    assert kv_cache_dtype("bfloat16", f32) == bf16 and prompt_attention_dtype("auto", f32) is None
    with caplog.at_level("INFO", logger="parrot.engine.llm_engine"):
        LLMEngine(EngineConfig(kv_memory_gb=0.02, cpu_bf16="all", kv_dtype="bfloat16"))
    assert "float32 (matmuls in bf16), KV cache bfloat16, prompt attention float32; " in caplog.text


def test_logits_near_the_top_are_exact_where_the_product_rounds_them_to_bf16():
    """A bf16 product rounds logits to steps of 0.125 near 25: two tokens 0.03 apart come out
    tied, and greedy would take the lower id. The entries near each row's top are computed
    again in float32, so the larger wins; the rest are left as the product gave them."""
    from parrot.engine.model import refine_near_top

    torch.manual_seed(0)
    hidden = 64
    last = torch.randn(2, hidden)  # [M, hidden]
    rows = torch.randn(100, hidden) * 0.1  # [V, hidden]
    for m, (low, high) in enumerate([(3, 7), (50, 20)]):  # the larger true value has the higher id, then the lower
        direction = last[m] / last[m].dot(last[m])
        rows[low] = direction * 25.00
        rows[high] = direction * 25.03
    exact = last @ rows.T  # [M, V]
    rounded = exact.bfloat16().float()
    assert torch.equal(rounded[0, 3], rounded[0, 7]) and torch.equal(rounded[1, 50], rounded[1, 20])
    assert rounded.argmax(-1).tolist() == [3, 20]  # by the rounding: the lower id of each tie
    refined = rounded.clone()
    refine_near_top(refined, last, rows)
    assert refined.argmax(-1).tolist() == [7, 20]
    torch.testing.assert_close(refined[0, 7], exact[0, 7])
    far = rounded < rounded.max(-1, keepdim=True).values - 1.0
    assert torch.equal(refined[far], rounded[far])


def test_a_linear_keeps_one_weight_where_every_step_uses_bf16():
    from parrot.engine.model import Linear

    weight, x = torch.randn(64, 32), torch.randn(5, 32)
    everywhere, small, exact = Linear.of(weight, None, ALL_ROWS), Linear.of(weight, None, 2), Linear.of(weight, None, 0)
    assert everywhere.weight.dtype == torch.bfloat16 and everywhere.small is None  # no float32 copy kept
    assert small.weight_for(2).dtype == torch.bfloat16 and small.weight_for(3).dtype == torch.float32
    assert exact.small is None and exact.weight_for(1).dtype == torch.float32
    for linear in (everywhere, small, exact):
        out = linear(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x @ weight.T, atol=0.1, rtol=0.02)
    torch.testing.assert_close(exact(x), x @ weight.T)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-layout", "plain-layout"])
def test_a_bf16_linear_gives_the_plain_bf16_product_in_either_weight_layout(monkeypatch, onednn):
    from parrot.engine import model
    from parrot.engine.device import onednn_packs_bf16

    if onednn and not onednn_packs_bf16():
        pytest.skip("this CPU does not multiply bf16 natively (no AVX512-BF16 or AMX): weights keep the plain layout")
    monkeypatch.setattr(model, "onednn_packs_bf16", lambda: onednn)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    linear = model.Linear.of(weight, bias, ALL_ROWS)
    assert linear.packed is onednn
    for rows in (1, 3, 64):  # one layout serves every step size
        x = torch.randn(rows, 32)
        expected = torch.nn.functional.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float() + bias
        torch.testing.assert_close(linear(x), expected, atol=1e-2, rtol=1e-2)
