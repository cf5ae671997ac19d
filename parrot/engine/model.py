"""Llama-family decoder (Llama, SmolLM, Qwen2, Mistral) in PyTorch (and our fused CPU ops where they apply).

Grouped-query attention, RoPE with the config's scaling, RMSNorm, SwiGLU, tied or
untied embeddings, q/k/v bias where the config has it. Inputs are a flat batch of
tokens from many sequences (continuous batching); attention goes through an
AttentionBackend over the paged KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parrot.engine.attention import AttentionBackend, AttentionMetadata
from parrot.engine.config import ModelConfig, RopeScaling
from parrot.engine.cpu_kernels import cpu_kernels_available
from parrot.engine.device import ALL_ROWS, onednn_packs_bf16


@dataclass(frozen=True)
class ForwardBatch:
    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    attention: AttentionMetadata
    logit_rows: torch.Tensor  # [M] int64: rows whose next-token logits are wanted


@dataclass
class Linear:
    """A weight [out, in], and on the CPU maybe a bf16 copy that steps of at most `bf16_rows`
    rows use (`bf16_matmul_rows` in device.py says when bf16 is the faster). Where every step
    would use the copy, it is the only weight kept: `weight` is bf16, the activations stay float32.

    Where the CPU multiplies bf16 natively, a bf16 weight is kept in oneDNN's blocked layout
    (`packed`), which its matmul reads without reordering: the default model's weights sweep
    in 9 ms at one row against 13 ms from the plain layout (1.1-1.4x up to 128 rows, the same
    at 512), with the same results."""

    weight: torch.Tensor  # [out, in]; opaque oneDNN layout where `packed`
    small: torch.Tensor | None = None  # [out, in] bf16
    bias: torch.Tensor | None = None  # [out]
    bf16_rows: int = 0
    packed: bool = False

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16_rows: int = 0) -> "Linear":
        if weight.device.type != "cpu":
            return cls(weight, None, bias)
        if bf16_rows >= ALL_ROWS and weight.dtype == torch.float32:
            weight = weight.to(torch.bfloat16)
        if weight.dtype == torch.bfloat16 and onednn_packs_bf16():
            return cls(torch.ops.mkldnn._reorder_linear_weight(weight), None, bias, packed=True)
        if not bf16_rows or weight.dtype != torch.float32:
            return cls(weight, None, bias)
        return cls(weight, weight.to(torch.bfloat16), bias, bf16_rows)

    def packed_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in] bf16, contiguous -> [N, out] bf16, on the packed weight (no bias)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def rounds_to_bf16(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs on bf16 weights and comes out rounded to bf16."""
        return self.packed or (self.small is not None and rows <= self.bf16_rows)

    def weight_for(self, rows: int) -> torch.Tensor:
        """The weight a step of `rows` rows multiplies by."""
        return self.small if self.small is not None and rows <= self.bf16_rows else self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out], in x's dtype"""
        if self.packed:
            out = self.packed_bf16(x.to(torch.bfloat16).contiguous()).to(x.dtype)
            return out if self.bias is None else out + self.bias
        weight = self.weight_for(x.shape[0])
        if weight.dtype == x.dtype:
            return F.linear(x, weight, self.bias)
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(H + 2 Hkv) * D, hidden]
    o_proj: Linear  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * inter, hidden]
    down: Linear  # [hidden, inter]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D]; cos: [N, 1, D] as (cos, cos); sin: [N, 1, D] as (-sin, sin) (rotate-half convention).

    Computes (x1 cos - x2 sin, x2 cos + x1 sin) for the halves x1, x2 of each head in
    four kernels for q and k together (the same roundings as the textbook form).
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (x2, x1)
    return (x * cos).add_(swapped.mul_(sin))


# bf16 keeps 8 significant bits: at a logit of 25 its values are 0.125 apart
BF16_SIGNIFICANT_BITS = 8
REFINE_STEPS = 2  # the rounding of the output and of the bf16 inputs stays well inside two steps


def refine_near_top(logits: torch.Tensor, last: torch.Tensor, output_rows: torch.Tensor, block: int = 64) -> None:
    """logits: [M, V] float32 from a bf16 product, in place; last: [M, hidden] its input;
    output_rows: [V, hidden] the output weights. Each row's entries within REFINE_STEPS bf16 steps
    of its top are computed again in float32: a bf16 product rounds logits to a step (0.125 near
    25), so greedy decoding would pick between near-tied tokens by the rounding (a tie by the
    lower token id) and not by their values (benchmarks/precision_probe.py). One pass reads the
    logits (the maxima of blocks of `block` columns), and only blocks that reach the window are
    looked into: 0.9 ms for 32 rows of 49k logits, where comparing every entry took 4 ms. An untied
    model keeps its output weights in its own dtype for this beside the bf16 copy."""
    m, v = logits.shape
    body = v - v % block
    maxima = logits[:, :body].unflatten(1, (-1, block)).amax(-1)  # [M, V // block]
    tail = logits[:, body:]  # [M, V % block]
    top = maxima.amax(-1, keepdim=True)  # [M, 1]
    if tail.shape[1]:
        top = torch.maximum(top, tail.amax(-1, keepdim=True))
    step = torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-30))) - (BF16_SIGNIFICANT_BITS - 1))
    floor = top - REFINE_STEPS * step  # [M, 1]
    block_rows, blocks = (maxima >= floor).nonzero(as_tuple=True)  # [B] each: blocks holding a candidate
    cols = blocks[:, None] * block + torch.arange(block, device=logits.device)  # [B, block]
    rows = block_rows[:, None].expand_as(cols)
    near = logits[rows, cols] >= floor[block_rows]  # [B, block]
    rows, cols = rows[near], cols[near]  # [K] each
    if tail.shape[1]:
        tail_rows, tail_cols = (tail >= floor).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, tail_rows]), torch.cat([cols, tail_cols + body])
    logits[rows, cols] = (last[rows].float() * output_rows[cols].float()).sum(-1)  # [K]


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        attention: AttentionBackend,
        dtype: torch.dtype,
        bf16_rows: int = 0,  # float32 matmuls of steps up to this many rows run in bf16 (0: exact float32)
    ):
        self.config = config
        self.bf16_rows = bf16_rows
        self.dtype = dtype
        self.attention = attention
        c = config
        self.embed = state["model.embed_tokens.weight"].to(dtype)  # [V, hidden]
        # the output rows in the model's dtype, kept apart from a bf16 lm_head (refine_near_top)
        self.output_rows = self.embed if c.tie_word_embeddings else state["lm_head.weight"].to(dtype)  # [V, hidden]
        self.lm_head = self._linear(self.output_rows)
        if self.embed.device.type != "cpu" or not self.lm_head.rounds_to_bf16(1):
            self.output_rows = None  # logits are exact for the model's dtype, or a GPU's captured graphs take no data-dependent shapes
        self.final_norm = state["model.norm.weight"].to(dtype)
        self.layers = [self._layer(state, i) for i in range(c.num_layers)]
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        angles = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float32), inv_freq)  # [P, D/2]
        cos, sin = angles.cos(), angles.sin()
        device = self.embed.device
        self.rope_cos = torch.cat((cos, cos), dim=-1).to(device, dtype)  # [P, D]
        self.rope_sin = torch.cat((-sin, sin), dim=-1).to(device, dtype)  # [P, D], signed for apply_rope
        self.fused = self._can_fuse()
        if self.fused:
            self.rope_half_cos, self.rope_half_sin = cos.contiguous(), sin.contiguous()  # [P, D/2] each

    def _can_fuse(self) -> bool:
        """Whether the layers' element-wise work runs through our fused CPU ops (cpu_kernels):
        where every matmul is bf16 on packed weights, activations float32, no q/k/v bias."""
        linears = [self.lm_head] + [getattr(layer, name) for layer in self.layers for name in ("qkv", "o_proj", "gate_up", "down")]
        return (
            self.dtype == torch.float32
            and not self.config.attention_bias
            and all(linear.packed for linear in linears)
            and cpu_kernels_available()
        )

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        return Linear.of(weight, bias, self.bf16_rows)

    def _layer(self, state: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        def w(name: str) -> torch.Tensor:
            return state[p + name].to(self.dtype)
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"), w("self_attn.v_proj.bias")])
        return LayerWeights(
            input_norm=w("input_layernorm.weight"),
            qkv=self._linear(
                torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")]), bias
            ),
            o_proj=self._linear(w("self_attn.o_proj.weight")),
            post_norm=w("post_attention_layernorm.weight"),
            gate_up=self._linear(torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])),
            down=self._linear(w("mlp.down_proj.weight")),
        )

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Runs all layers over the flat batch; returns float32 logits [M, V] for batch.logit_rows.
        attention: a backend for this call in place of the model's (a static decode batch's)."""
        layers = self._layers_fused if self.fused else self._layers
        hidden = layers(batch, kv_caches, attention or self.attention)  # [N, hidden]
        c = self.config
        last = F.rms_norm(hidden[batch.logit_rows], (c.hidden_size,), self.final_norm, c.rms_norm_eps)  # [M, hidden]
        logits = self.lm_head(last).float()  # [M, V]
        if self.output_rows is not None and last.shape[0] and self.lm_head.rounds_to_bf16(last.shape[0]):
            refine_near_top(logits, last, self.output_rows)
        return logits

    def _layers(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attention: AttentionBackend) -> torch.Tensor:
        """The residual stream [N, hidden] after the last layer."""
        c = self.config
        n = batch.token_ids.shape[0]
        heads = c.num_heads + c.num_kv_heads
        q_size, qk_size = c.num_heads * c.head_dim, heads * c.head_dim
        eps = c.rms_norm_eps
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [N, 1, D], gathered once per step
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        hidden = self.embed[batch.token_ids]  # [N, hidden]; a fresh tensor, updated in place below
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = F.rms_norm(hidden, (c.hidden_size,), layer.input_norm, eps)
            qkv = layer.qkv(x)  # [N, (H + 2 Hkv) * D]
            qk = apply_rope(qkv[:, :qk_size].view(n, heads, c.head_dim), cos, sin)  # q and k heads in one call
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
            v = qkv[:, qk_size:].view(n, c.num_kv_heads, c.head_dim)
            attn = attention.forward(q, k, v, k_cache, v_cache, batch.attention)  # [N, H, D]
            hidden.add_(layer.o_proj(attn.reshape(n, q_size)))
            x = F.rms_norm(hidden, (c.hidden_size,), layer.post_norm, eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # [N, inter] each
            hidden.add_(layer.down(F.silu(gate).mul_(up)))
        return hidden

    def _layers_fused(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      attention: AttentionBackend) -> torch.Tensor:
        """_layers() with the element-wise work in fused ops: the same math, the residual stream
        in float32, each matmul's input rounded to bf16 once, as the packed matmuls need it."""
        c = self.config
        n = batch.token_ids.shape[0]
        kernels = torch.ops.parrot_kernels
        hidden = self.embed[batch.token_ids]  # [N, hidden] float32, updated in place
        delta = None  # [N, hidden] bf16: the last MLP's output, added into hidden by the next norm
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = kernels.rms_norm_bf16(hidden, delta, layer.input_norm, c.rms_norm_eps)  # [N, hidden] bf16
            q, k, v = kernels.rope_qkv(layer.qkv.packed_bf16(x), self.rope_half_cos, self.rope_half_sin, batch.positions,
                                       c.num_heads, c.num_kv_heads)  # [N, H, D], [N, Hkv, D] x2, float32
            attn = attention.forward(q, k, v, k_cache, v_cache, batch.attention)  # [N, H, D]
            out = layer.o_proj.packed_bf16(attn.reshape(n, -1).to(torch.bfloat16))  # [N, hidden] bf16
            x = kernels.rms_norm_bf16(hidden, out, layer.post_norm, c.rms_norm_eps)
            delta = layer.down.packed_bf16(kernels.silu_mul_bf16(layer.gate_up.packed_bf16(x)))
        if delta is not None:
            hidden.add_(delta)
        return hidden
