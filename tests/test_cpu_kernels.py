"""The compiled CPU decode kernel: exact against a float64 reference and against the PyTorch
path on random paged batches, batch-invariant (greedy decoding repeats), right on empty rows,
long contexts split across threads and bfloat16 caches; a machine that cannot build it runs
the PyTorch path."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F

from parrot.engine import cpu_kernels
from parrot.engine.attention import CpuPagedAttention
from parrot.engine.cpu_kernels import cpu_kernels_available, paged_decode
from parrot.engine.sampler import SamplingParams
from test_shared_prefix_attention import ATOL, random_batch, reference

needs_kernels = pytest.mark.skipif(not cpu_kernels_available(), reason="the CPU kernels did not build here (see the log)")


def _decode_only(heads: int, kv_heads: int, head_dim: int, lens: list[int], block_size: int, seed: int = 0):
    """q [B, H, D], caches with each row's blocks scattered, tables [B, W], lengths [B]."""
    gen = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = len(lens) * width + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: len(lens) * width].view(len(lens), width).contiguous()
    cache = (kv_heads, num_blocks, block_size, head_dim)
    q = torch.randn((len(lens), heads, head_dim), generator=gen)
    return q, torch.randn(cache, generator=gen), torch.randn(cache, generator=gen), tables, torch.tensor(lens)


def _reference_rows(q, k_cache, v_cache, tables, lens):
    """Float64 attention of each row over its first lens[b] entries -> out [B, H, D], lse [B, H]."""
    hkv, _, bs, d = k_cache.shape
    g = q.shape[1] // hkv
    outs, lses = [], []
    for b, n in enumerate(lens.tolist()):
        slots = torch.tensor([tables[b, p // bs].item() * bs + p % bs for p in range(n)], dtype=torch.int64)
        keys = k_cache.reshape(hkv, -1, d)[:, slots].double().repeat_interleave(g, 0)  # [H, n, D]
        values = v_cache.reshape(hkv, -1, d)[:, slots].double().repeat_interleave(g, 0)
        scores = (q[b].double().unsqueeze(1) @ keys.transpose(1, 2)).squeeze(1) / d**0.5  # [H, n]
        outs.append((scores.softmax(-1).unsqueeze(1) @ values).squeeze(1))
        lses.append(torch.logsumexp(scores, -1))
    return torch.stack(outs), torch.stack(lses)


@needs_kernels
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 8, 128, 4), (6, 2, 64, 1), (20, 2, 64, 16)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_pytorch_path_and_a_float64_reference(seed, heads, kv_heads, head_dim, block_size, kv_dtype):
    """Whole steps (decode rows among prefill chunks, forked and scattered blocks): the kernel's
    backend and the PyTorch backend write the same cache and give the same rows; a bf16 cache
    is read as the float32 values it holds, by every path."""
    batch = random_batch(seed, heads, kv_heads, head_dim, block_size)
    kernel_k, kernel_v = batch.k_cache.to(kv_dtype), batch.v_cache.to(kv_dtype)
    torch_k, torch_v = batch.k_cache.to(kv_dtype), batch.v_cache.to(kv_dtype)
    out = CpuPagedAttention(decode_kernel=True).forward(batch.q, batch.k, batch.v, kernel_k, kernel_v, batch.meta())
    plain = CpuPagedAttention(decode_kernel=False).forward(batch.q, batch.k, batch.v, torch_k, torch_v, batch.meta())
    assert torch.equal(kernel_k, torch_k) and torch.equal(kernel_v, torch_v)
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.double(), reference(batch, kernel_k.float(), kernel_v.float()), atol=ATOL, rtol=0)


@needs_kernels
@pytest.mark.parametrize("lens,block_size", [([1], 16), ([5000], 16), ([3, 0, 700, 17], 16), ([300] * 40, 16), ([1100, 513, 0], 48)])
def test_kernel_rows_and_log_sum_exps(lens, block_size):
    """Single tokens, long contexts (split at fixed points across threads and merged, also with
    blocks that do not divide the split), empty rows (zeros and -inf, so they weigh nothing in a
    merge) and wide batches."""
    q, k_cache, v_cache, tables, lengths = _decode_only(9, 3, 64, lens, block_size)
    got = paged_decode(q, k_cache, v_cache, tables, lengths)
    want_out, want_lse = _reference_rows(q, k_cache, v_cache, tables, lengths)
    empty = lengths == 0
    assert torch.equal(got.out[empty], torch.zeros_like(got.out[empty]))
    assert bool((got.lse[empty] == float("-inf")).all())
    torch.testing.assert_close(got.out[~empty].double(), want_out[~empty], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.lse[~empty].double(), want_lse[~empty], atol=1e-4, rtol=0)


@needs_kernels
def test_a_row_does_not_depend_on_its_batch():
    """Greedy decoding repeats only if a sequence's attention is the same whatever else is in the
    step: bit-for-bit, alone or among others, at any position of the batch."""
    q, k_cache, v_cache, tables, lengths = _decode_only(9, 3, 64, [900, 40, 333, 1200, 7], 16, seed=3)
    together = paged_decode(q, k_cache, v_cache, tables, lengths).out
    for b in range(len(lengths)):
        alone = paged_decode(q[b : b + 1], k_cache, v_cache, tables[b : b + 1], lengths[b : b + 1]).out
        assert torch.equal(alone[0], together[b])
    reverse = torch.arange(len(lengths) - 1, -1, -1)
    assert torch.equal(paged_decode(q[reverse], k_cache, v_cache, tables[reverse], lengths[reverse]).out, together[reverse])


@needs_kernels
def test_bfloat16_caches_are_read_in_float32():
    """A bfloat16 cache is widened, not the math narrowed: the result is the float64 attention
    over the cache's own bf16 values, to float32 accuracy."""
    q, k_cache, v_cache, tables, lengths = _decode_only(9, 3, 64, [200, 31], 16, seed=5)
    k16, v16 = k_cache.bfloat16(), v_cache.bfloat16()
    got = paged_decode(q, k16, v16, tables, lengths)
    want, _ = _reference_rows(q, k16.float(), v16.float(), tables, lengths)
    assert got.out.dtype == torch.float32
    torch.testing.assert_close(got.out.double(), want, atol=ATOL, rtol=0)


def test_other_head_sizes_run_the_pytorch_path():
    """Head sizes the kernel is not compiled for go through PyTorch operators, still exact."""
    batch = random_batch(1, 4, 4, 32, 4)
    assert not cpu_kernels.kernel_decodes(32, torch.float32, torch.device("cpu"))
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = CpuPagedAttention().forward(batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta())
    torch.testing.assert_close(out.double(), reference(batch, k_cache, v_cache), atol=ATOL, rtol=0)


def test_float16_caches_run_the_pytorch_path():
    """A float16 model on the CPU (a cache the kernel does not read) still decodes."""
    batch = random_batch(2, 9, 3, 64, 16)
    q, k, v = batch.q.half(), batch.k.half(), batch.v.half()
    k_cache, v_cache = batch.k_cache.half(), batch.v_cache.half()
    assert not cpu_kernels.kernel_decodes(64, torch.float16, torch.device("cpu"))
    out = CpuPagedAttention().forward(q, k, v, k_cache, v_cache, batch.meta())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), reference(batch, k_cache.float(), v_cache.float()), atol=5e-3, rtol=0)


@needs_kernels
def test_bf16_rounding_keeps_nan_and_infinity():
    """A NaN from the model stays visible (a bare round-to-nearest carries some NaNs into zeros or infinities)."""
    nan_payloads = torch.tensor([0x7FFFFFFF, 0x7F800001, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    gate_up = torch.cat([torch.ones(4), nan_payloads]).view(1, 8).bfloat16()
    assert torch.isnan(torch.ops.parrot_kernels.silu_mul_bf16(gate_up).float()).all()
    hidden = torch.stack([nan_payloads[:2], nan_payloads[2:]])  # NaNs with low payload bits set, as float32 math leaves them
    assert torch.isnan(torch.ops.parrot_kernels.rms_norm_bf16(hidden, None, torch.ones(2), 1e-5).float()).all()


def test_a_failed_build_is_logged_and_falls_back(monkeypatch, caplog, tmp_path):
    """No compiler (or no ninja): one warning that says so, and the engine runs without the kernel."""
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("PARROT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="parrot.engine.cpu_kernels"):
        assert cpu_kernels.cpu_kernels_available.__wrapped__() is False
    assert "Ninja is required" in caplog.text and "PyTorch operators" in caplog.text


def test_the_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PARROT_CPU_KERNELS", "0")
    assert cpu_kernels.cpu_kernels_available.__wrapped__() is False


# ---- the fused element-wise ops of a layer ------------------------------------------------

BF16_ULP = 2**-7  # relative spacing of bf16: a rounding of a float32 value that lies near a tie may go either way


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_fused_rms_norm_is_the_norm_rounded_once(rows):
    """With a residual to add first (in place, into the float32 stream) and without."""
    hidden, weight = torch.randn(rows, 576), torch.rand(576) + 0.5
    delta = torch.randn(rows, 576).bfloat16()
    stream = hidden.clone()
    got = torch.ops.parrot_kernels.rms_norm_bf16(stream, delta, weight, 1e-5)
    expected_stream = hidden + delta.float()
    torch.testing.assert_close(stream, expected_stream, atol=1e-6, rtol=0)
    want = F.rms_norm(expected_stream, (576,), weight, 1e-5).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=BF16_ULP)
    plain = torch.ops.parrot_kernels.rms_norm_bf16(hidden.clone(), None, weight, 1e-5)
    torch.testing.assert_close(plain.float(), F.rms_norm(hidden, (576,), weight, 1e-5).bfloat16().float(), atol=0, rtol=BF16_ULP)


@needs_kernels
def test_fused_rope_equals_the_model_rope():
    from parrot.engine.model import apply_rope

    heads, kv_heads, d, n = 9, 3, 64, 7
    angles = torch.outer(torch.arange(100, dtype=torch.float32), torch.rand(d // 2))  # [P, D/2]
    cos, sin = angles.cos(), angles.sin()
    positions = torch.tensor([0, 3, 99, 50, 50, 1, 2])
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d).bfloat16()
    q, k, v = torch.ops.parrot_kernels.rope_qkv(qkv, cos, sin, positions, heads, kv_heads)
    wide = qkv.float()
    full_cos = torch.cat((cos, cos), -1)[positions].unsqueeze(1)
    full_sin = torch.cat((-sin, sin), -1)[positions].unsqueeze(1)
    qk = apply_rope(wide[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d), full_cos, full_sin)
    torch.testing.assert_close(q, qk[:, :heads], atol=1e-6, rtol=0)
    torch.testing.assert_close(k, qk[:, heads:], atol=1e-6, rtol=0)
    assert torch.equal(v, wide[:, (heads + kv_heads) * d :].view(n, kv_heads, d))


@needs_kernels
def test_fused_silu_mul_is_the_product_rounded_once():
    gate_up = (3 * torch.randn(6, 2 * 1536)).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    got = torch.ops.parrot_kernels.silu_mul_bf16(gate_up)
    torch.testing.assert_close(got.float(), (F.silu(gate) * up).bfloat16().float(), atol=1e-30, rtol=BF16_ULP)


@needs_kernels
def test_the_fused_layer_path_gives_the_model_path_logits():
    """The default engine on a CPU with bf16 dot products (packed bf16 weights): its fused
    forward against the same model through PyTorch operators, same weights and cache."""
    from parrot.engine.llm_engine import EngineConfig, LLMEngine
    from parrot.engine.model_runner import prompt_logits
    from test_device import PROMPTS

    engine = LLMEngine(EngineConfig(kv_memory_gb=0.05))
    if not engine.model.fused:
        pytest.skip("this CPU does not multiply bf16 natively: the layers run unfused")
    for ids in (engine.tokenizer.encode(p) for p in PROMPTS):
        fused = prompt_logits(engine.model, engine.runner.kv, ids, torch.device("cpu"))
        engine.model.fused = False
        try:
            plain = prompt_logits(engine.model, engine.runner.kv, ids, torch.device("cpu"))
        finally:
            engine.model.fused = True
        # the lm_head's output is bf16 (a unit in the last place is 0.125 at logits of 16-32): the
        # two paths differ in the order of the norms' sums, so roundings differ by an ulp here and
        # there and compound over 30 layers: a few ulps at most, a fraction of one on average
        torch.testing.assert_close(fused, plain, atol=1.0, rtol=0)
        assert (fused - plain).abs().mean() < 0.1
        top2 = plain.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 1.0
        assert torch.equal(fused.argmax(-1)[clear], plain.argmax(-1)[clear])


def _prompt_logits_of_both(engine, reference):
    """(engine's, reference's) float32 logits of every position of each test prompt, prefilled fresh."""
    from parrot.engine.model_runner import prompt_logits
    from test_device import PROMPTS

    for ids in (reference.tokenizer.encode(p) for p in PROMPTS):
        got = prompt_logits(engine.model, engine.runner.kv, ids, torch.device("cpu"))
        want = prompt_logits(reference.model, reference.runner.kv, ids, torch.device("cpu"))
        assert got.dtype == want.dtype == torch.float32
        yield got, want


def test_a_bfloat16_kv_cache_holds_twice_the_tokens_and_gives_the_same_logits():
    """--kv-dtype bfloat16 on the CPU: half the bytes a token, twice the blocks in the same
    memory; prompt logits within bf16 rounding of the float32 cache's, the math in float32."""
    from parrot.engine.llm_engine import EngineConfig, LLMEngine
    from parrot.errors import UserError

    with pytest.raises(UserError, match="kv_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(kv_dtype="fp8")
    wide, narrow = (LLMEngine(EngineConfig(kv_memory_gb=0.05, kv_dtype=kv)) for kv in ("float32", "bfloat16"))
    assert narrow.runner.kv.layers[0][0].dtype == torch.bfloat16
    assert narrow.stats().blocks_total >= 2 * wide.stats().blocks_total - 1
    for got, want in _prompt_logits_of_both(narrow, wide):
        torch.testing.assert_close(got, want, atol=0.75, rtol=0)
        assert (got - want).abs().mean() < 0.1


def test_bfloat16_prompt_attention_stays_within_bf16_rounding_and_is_opt_in():
    """--prompt-attention-dtype bfloat16: prompt attention in bf16 (vLLM's precision), the
    logits still float32 and within bf16 rounding of the float32 attention's, the greedy token
    the same where the top two do not nearly tie; a prompt forked from its cached prefix (the
    masked path over cached KV) too. The default is float32."""
    from parrot.engine.attention import CpuPagedAttention
    from parrot.engine.llm_engine import EngineConfig, LLMEngine
    from parrot.engine.shared_prefix_attention import SharedPrefixCpuAttention
    from parrot.errors import UserError
    from test_device import PROMPTS

    with pytest.raises(UserError, match="prompt_attention_dtype must be one of auto, float32, bfloat16"):
        EngineConfig(prompt_attention_dtype="int8")
    with pytest.raises(UserError, match="on a cuda device attention runs in the model's dtype"):
        EngineConfig(device="cuda", prompt_attention_dtype="bfloat16")
    exact, fast = (LLMEngine(EngineConfig(kv_memory_gb=0.05, prompt_attention_dtype=p)) for p in ("auto", "bfloat16"))
    plain = [a.plain if isinstance(a, SharedPrefixCpuAttention) else a for a in (exact.model.attention, fast.model.attention)]
    assert all(isinstance(a, CpuPagedAttention) for a in plain)
    assert (plain[0].prompt_dtype, plain[1].prompt_dtype) == (None, torch.bfloat16)
    for got, want in _prompt_logits_of_both(fast, exact):
        torch.testing.assert_close(got, want, atol=1.5, rtol=0)
        assert (got - want).abs().mean() < 0.2
        top2 = want.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2.0
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    # a repeat forks from the first's cached prefix: its last tokens attend over cached KV
    prompt = exact.tokenizer.encode(" ".join(PROMPTS) * 3)
    computed = []
    for _ in range(2):
        before = fast.stats().tokens_processed
        assert asyncio.run(fast.complete(prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
        computed.append(fast.stats().tokens_processed - before)
    assert computed[1] < computed[0] - 32
