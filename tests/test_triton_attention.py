"""The work-item form of shared-prefix attention: exact on the CPU (items run in torch), and the
Triton kernel equal to it on CUDA (tests marked gpu, skipped without CUDA and Triton)."""

from __future__ import annotations

import random

import pytest
import torch

from parrot.engine.attention import CpuPagedAttention
from parrot.engine.triton_attention import INTERPRET, TritonSharedPrefixAttention, build_items, run_items_torch, triton

from test_shared_prefix_attention import ATOL, random_batch, reference

# the kernel runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1, slow)
needs_cuda = pytest.mark.skipif(triton is None or not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA and Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = [(9, 3, 64, 16), (4, 4, 32, 4), (9, 3, 16, 1)]  # heads, kv heads, head dim, block size


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", CONFIGS)
def test_items_backend_equals_plain_attention_on_the_cpu(seed, heads, kv_heads, head_dim, block_size):
    batch = random_batch(seed, heads, kv_heads, head_dim, block_size)
    # chunks of 2 blocks split every segment and suffix: the merge sees many parts per row
    backend = TritonSharedPrefixAttention(CpuPagedAttention(), min_shared_tokens=1, chunk_tokens=2 * block_size)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = backend.forward(batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta())
    plain = CpuPagedAttention().forward(batch.q, batch.k, batch.v, batch.k_cache.clone(), batch.v_cache.clone(), batch.meta())
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.double(), reference(batch, k_cache, v_cache), atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", CONFIGS)
def test_whole_backend_with_causal_prefill_items_equals_plain_attention_on_the_cpu(seed, heads, kv_heads, head_dim, block_size):
    """Decode and prefill rows (chunks after a cached prefix, fresh prompts) all through work items."""
    batch = random_batch(seed, heads, kv_heads, head_dim, block_size)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = TritonSharedPrefixAttention(min_shared_tokens=1, chunk_tokens=2 * block_size).forward(
        batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta()
    )
    torch.testing.assert_close(out.double(), reference(batch, k_cache, v_cache), atol=ATOL, rtol=0)


def random_items(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 causal: bool = False):
    """Items of 1-70 query rows (several row tiles) over 1-300 tokens of scattered blocks, on CUDA.
    causal: each item's rows are distinct, at least as many tokens as rows (a prefill chunk)."""
    rng = random.Random(seed)
    num_blocks, batch = 200, 24 if not causal else 300
    groups, fresh = [], iter(rng.sample(range(batch), batch))
    for _ in range(rng.randint(1, 8 if not causal else 4)):
        count = rng.choice([1, 2, 5, 24, 70])
        rows = [next(fresh) for _ in range(count)] if causal else [rng.randrange(batch) for _ in range(count)]
        tokens = rng.randint(count if causal else 1, 300)
        groups.append((rows, [rng.randrange(num_blocks) for _ in range(-(-tokens // block_size))], tokens))
    gen = torch.Generator().manual_seed(seed)
    cache = (kv_heads, num_blocks, block_size, head_dim)
    q = torch.randn((batch, heads, head_dim), generator=gen).to(DEVICE)
    k_cache = torch.randn(cache, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(cache, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, build_items(groups, DEVICE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", CONFIGS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernel_equals_torch_items(seed, heads, kv_heads, head_dim, block_size, dtype, atol, causal):
    from parrot.engine.triton_attention import run_items_triton

    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter computes bfloat16 tl.dot wrongly (checked on a 16x16 product)")
    q, k_cache, v_cache, items = random_items(seed, heads, kv_heads, head_dim, block_size, dtype, causal)
    got = run_items_triton(q, k_cache, v_cache, items, causal)
    expected = run_items_torch(q, k_cache, v_cache, items, causal)
    torch.testing.assert_close(got.out, expected.out, atol=atol, rtol=0)
    torch.testing.assert_close(got.lse, expected.lse, atol=atol, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", CONFIGS)
def test_triton_backend_equals_plain_attention(seed, heads, kv_heads, head_dim, block_size):
    batch = random_batch(seed, heads, kv_heads, head_dim, block_size)
    plain_k, plain_v = batch.k_cache.clone(), batch.v_cache.clone()
    plain = CpuPagedAttention().forward(batch.q, batch.k, batch.v, plain_k, plain_v, batch.meta())
    backend = TritonSharedPrefixAttention(min_shared_tokens=1, chunk_tokens=4 * block_size)
    k_cache, v_cache = batch.k_cache.to(DEVICE), batch.v_cache.to(DEVICE)
    out = backend.forward(batch.q.to(DEVICE), batch.k.to(DEVICE), batch.v.to(DEVICE), k_cache, v_cache, batch.meta())
    torch.testing.assert_close(out.cpu(), plain, atol=ATOL, rtol=0)
    assert torch.equal(k_cache.cpu(), plain_k) and torch.equal(v_cache.cpu(), plain_v)
