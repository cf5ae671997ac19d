"""Turns a step plan into one forward pass over the flat batch and samples from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parrot.engine.attention import AttentionMetadata, SequenceSlice
from parrot.engine.config import ModelConfig
from parrot.engine.device import cpu_zeros_on_huge_pages
from parrot.engine.model import ForwardBatch, LlamaModel
from parrot.engine.outputs import TokenLogprobs
from parrot.engine.batch_sampling import RowConstraints, sample_batch
from parrot.engine.penalties import TokenCounts
from parrot.engine.sampler import token_logprobs
from parrot.engine.structured import allowed_masks
from parrot.engine.scheduler import Job, JobKind, ScheduledChunk, StepPlan

if TYPE_CHECKING:
    from parrot.engine.cuda_graphs import DecodeGraphs


def prompt_logits(model: LlamaModel, kv: KVCacheTensors, ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh prefill of ids over blocks 0.. of the cache, outside any plan -> float32 logits
    [L, V] of every position: for checks of the model's numerics (tests, benchmarks/precision_probe.py)."""
    blocks = list(range(-(-len(ids) // kv.block_size)))
    on = dict(dtype=torch.int64, device=device)
    batch = ForwardBatch(
        torch.tensor(ids, **on), torch.arange(len(ids), **on),
        AttentionMetadata.build([SequenceSlice(0, len(ids), len(ids), blocks)], list(range(len(ids)))),
        torch.arange(len(ids), **on),
    )
    return model.forward(batch, kv.layers)


@dataclass(frozen=True)
class StepResult:
    sampled: dict[int, int]  # id(job) -> next token, for chunks that wanted logits
    replayed_graph: bool = False  # the step ran from the decode graphs' static buffers
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # id(job) -> of its token, where its sampling asks
    # id(job) of a SCORE job -> position -> the log probabilities of the token after it, for the
    # chunk's positions that have one
    scores: dict[int, dict[int, TokenLogprobs]] = field(default_factory=dict)


class KVCacheTensors:
    """Per-layer K and V tensors, [Hkv, num_blocks, block_size, D] each."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.block_size = block_size
        shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)

        on_cpu = torch.device(device).type == "cpu"

        def zeros() -> torch.Tensor:
            return cpu_zeros_on_huge_pages(shape, dtype) if on_cpu else torch.zeros(shape, dtype=dtype, device=device)

        self.layers = [(zeros(), zeros()) for _ in range(config.num_layers)]

    def copy_block(self, src: int, dst: int) -> None:
        for k, v in self.layers:
            k[:, dst].copy_(k[:, src])
            v[:, dst].copy_(v[:, src])

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * element


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCacheTensors, graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv = kv
        self.graphs = graphs  # decode steps from static buffers (CUDA graphs on a GPU)
        self.device = kv.layers[0][0].device

    def run(self, plan: StepPlan) -> StepResult:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceSlice] = []
        logit_rows: list[int] = []
        scored: list[ScheduledChunk] = []  # SCORE chunks, whose rows come after the sampled ones
        score_rows: list[int] = []
        for chunk in plan.chunks:
            ctx = chunk.job.ctx
            sequences.append(SequenceSlice(len(tokens), chunk.length, chunk.start + chunk.length, list(ctx.block_table)))
            tokens.extend(ctx.token_ids[chunk.start : chunk.start + chunk.length])
            positions.extend(range(chunk.start, chunk.start + chunk.length))
            slots.extend(chunk.slots)
            if chunk.wants_logits:
                logit_rows.append(len(tokens) - 1)
            elif chunk.job.kind is JobKind.SCORE:
                scored.append(chunk)
                first = len(tokens) - chunk.length
                score_rows.extend(range(first, first + len(_next_token_positions(chunk))))
        logit_rows += score_rows
        tables, lengths = [s.block_table for s in sequences], [s.context_len for s in sequences]
        static_plan = self.graphs.plan(tables, lengths) if self.graphs is not None and len(tokens) == len(sequences) else None
        if static_plan is not None:
            # a decode step: every row's logits come out, the sampled ones are kept; a fill of
            # one token per context samples nothing: its rows are an empty index, which must still be integers
            logits = self.graphs.run(tokens, positions, slots, tables, static_plan)[torch.tensor(logit_rows, dtype=torch.int64, device=self.device)]
        else:
            on = dict(dtype=torch.int64, device=self.device)
            batch = ForwardBatch(
                token_ids=torch.tensor(tokens, **on),
                positions=torch.tensor(positions, **on),
                attention=AttentionMetadata.build(sequences, slots),
                logit_rows=torch.tensor(logit_rows, **on),
            )
            logits = self.model.forward(batch, self.kv.layers)  # [M, V]
        sampling_jobs = [c.job for c in plan.chunks if c.wants_logits]
        scores = _scores(scored, logits[len(sampling_jobs):]) if scored else {}
        logits = logits[: len(sampling_jobs)]
        if not sampling_jobs:
            return StepResult({}, static_plan is not None, scores=scores)
        structured = [j for j in sampling_jobs if j.grammar is not None]
        masks = dict(zip(map(id, structured), allowed_masks([j.grammar for j in structured]))) if structured else {}
        constraints = [_constraints(j, self.model.config.eos_token_ids, masks.get(id(j)), logits) for j in sampling_jobs]
        next_tokens = sample_batch(logits, [j.sampling for j in sampling_jobs], [j.generator for j in sampling_jobs], constraints)
        sampled = {id(job): token for job, token in zip(sampling_jobs, next_tokens)}
        asking = [row for row, job in enumerate(sampling_jobs) if job.sampling.logprobs is not None]
        reported = token_logprobs(logits[asking], [next_tokens[row] for row in asking],
                                  [sampling_jobs[row].sampling.logprobs for row in asking]) if asking else []
        return StepResult(sampled, static_plan is not None, {id(sampling_jobs[row]): r for row, r in zip(asking, reported)}, scores)


def _constraints(job: Job, eos_token_ids: tuple[int, ...], allowed: torch.Tensor | None, logits: torch.Tensor) -> RowConstraints | None:
    """For penalties, the job's tokens counted (its context split into its prompt and the tokens
    its generate has sampled so far, on the device and vocabulary of `logits` [B, V]); for
    structured output, the tokens its grammar allows next (`allowed`, [V] bool, computed with the
    step's other grammars); before min_tokens, the tokens that would end the output."""
    sampling = job.sampling
    early = job.num_generated < sampling.min_tokens and job.grammar is None  # a structure's end is its grammar's
    if not sampling.penalizes and job.grammar is None and not early:
        return None
    if sampling.penalizes:
        ids = job.ctx.token_ids
        job.token_counts = job.token_counts.catch_up(ids, job.num_generated) if job.token_counts is not None \
            else TokenCounts.of_context(ids, job.num_generated, logits.shape[-1], logits.device)
    banned = tuple(sampling.stop_token_ids) + (() if sampling.ignore_eos else tuple(eos_token_ids)) if early else ()
    return RowConstraints(job.token_counts if sampling.penalizes else None, allowed, banned)


def _next_token_positions(chunk: ScheduledChunk) -> range:
    """The chunk's positions whose next token is in the context (all but a prompt's last)."""
    return range(chunk.start, min(chunk.start + chunk.length, len(chunk.job.ctx.token_ids) - 1))


def _scores(chunks: list[ScheduledChunk], logits: torch.Tensor) -> dict[int, dict[int, TokenLogprobs]]:
    """logits [R, V]: the rows of the SCORE chunks' positions that have a next token, in order."""
    scores: dict[int, dict[int, TokenLogprobs]] = {}
    row = 0
    for chunk in chunks:
        positions = _next_token_positions(chunk)
        ids = chunk.job.ctx.token_ids
        reported = token_logprobs(logits[row : row + len(positions)], [ids[p + 1] for p in positions], [chunk.job.score_top] * len(positions))
        scores[id(chunk.job)] = dict(zip(positions, reported))
        row += len(positions)
    return scores
