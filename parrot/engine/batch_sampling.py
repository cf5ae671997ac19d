"""Sampling a batch's rows at their temperatures, min_p, top_k and top_p, without sorting the vocabulary.

The plain way (apply_min_p, apply_top_k, apply_top_p in sampler.py, then torch.multinomial) sorts
each row's whole vocabulary for top_p and draws over all of it: on this project's CPUs 3.4 ms and
1.2 ms a row for a 49k-token vocabulary, some 150 ms a step at batch 32, longer than the step's
forward pass. Here a row's nucleus is found among its likeliest tokens (one batched topk,
CANDIDATE_TIERS), which hold it whenever their mass reaches top_p; a row whose nucleus reaches
past them takes the plain way. A token is then drawn by an exponential race among the kept
tokens (_race), each token's number keyed by its id and a seed the row draws from its own
generator where it has one. The distribution each row samples from is the plain way's, to
rounding (ties at the nucleus' edge may keep another of the tied tokens); which token a given
seed yields is this module's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parrot.engine.penalties import TokenCounts, apply_penalties
from parrot.engine.sampler import SamplingParams, apply_token_rules, apply_top_k, apply_top_p

# likeliest tokens a row's nucleus is looked for among, in turn: at temperature 0.7 the first
# 256 held 90 % of the mass in 98 % of a small model's rows, the first 4096 in all of them
CANDIDATE_TIERS = (256, 4096)
RACE_HEAD = 256  # tokens a draw over a whole vocabulary races first (most draws end among them)


@dataclass(frozen=True)
class RowConstraints:
    """What a row's sampling takes besides its logits: its tokens counted (for penalties) and the
    tokens its grammar allows next (structured output), each where it applies."""

    counts: TokenCounts | None = None
    allowed: torch.Tensor | None = None  # [V] bool
    banned: tuple[int, ...] = ()  # token ids that may not come next (the end tokens, before min_tokens)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 constraints: list[RowConstraints | None] | None = None) -> list[int]:
    """logits: [B, V] -> one token per row. Greedy rows without rules share one argmax; rows with
    rules (token rules, penalties, a grammar) have them applied together (_apply_rules); the rows
    that sample are drawn together (sample_rows)."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    constraints = constraints or [None] * len(params)
    ruled_rows = [row for row, (p, limits) in enumerate(zip(params, constraints)) if limits is not None or p.shapes_tokens]
    ruled_position = {row: i for i, row in enumerate(ruled_rows)}
    if ruled_rows:
        ruled = _apply_rules(logits[ruled_rows].float(), [params[r] for r in ruled_rows], [constraints[r] for r in ruled_rows])  # [K, V]
        for row, token in zip(ruled_rows, torch.argmax(ruled, dim=-1).tolist()):
            if params[row].greedy:
                tokens[row] = token
    sampling_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampling_rows:
        rows_logits = logits[sampling_rows].float()  # [R, V]
        for i, row in enumerate(sampling_rows):
            if row in ruled_position:
                rows_logits[i] = ruled[ruled_position[row]]
        drawn = sample_rows(rows_logits, [params[r] for r in sampling_rows], [generators[r] for r in sampling_rows])
        for row, token in zip(sampling_rows, drawn):
            tokens[row] = token
    return tokens


def _apply_rules(logits: torch.Tensor, params: list[SamplingParams], constraints: list[RowConstraints | None]) -> torch.Tensor:
    """logits: [K, V] float32, a copy the rules may change -> the same after each row's token rules,
    penalties, grammar mask and held-back tokens (penalties and masks applied to all rows at once)."""
    device = logits.device
    for i, p in enumerate(params):
        if p.shapes_tokens:
            logits[i] = apply_token_rules(logits[i], p)
    penalized = [i for i, limits in enumerate(constraints) if limits is not None and limits.counts is not None]
    if penalized:
        rows = torch.tensor(penalized, device=device)
        logits[rows] = apply_penalties(logits[rows], [constraints[i].counts for i in penalized], [params[i] for i in penalized])
    masked = [i for i, limits in enumerate(constraints) if limits is not None and limits.allowed is not None]
    if masked:
        rows = torch.tensor(masked, device=device)
        allowed = torch.stack([constraints[i].allowed for i in masked]).to(device)  # [M, V]
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    for i, limits in enumerate(constraints):
        if limits is not None and limits.banned:
            held = logits[i].index_fill(0, torch.tensor(limits.banned, device=device), float("-inf"))
            # where only ending tokens are allowed (allowed_token_ids), the output ends before min_tokens
            if bool(torch.isfinite(held).any()):
                logits[i] = held
    return logits


@dataclass(frozen=True)
class RowChoices:
    """The tokens a batch's rows may sample and their probabilities: row r samples ids[r, j] with
    probability probs[r, j] / probs[r].sum() (dropped tokens hold 0)."""

    ids: torch.Tensor  # [R, C] int64
    probs: torch.Tensor  # [R, C] float32
    whole_vocabulary: bool = False  # ids are every token in order (ids[r, j] == j)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [R, V] of rows that sample (temperature > 0), each with its settings -> one token id per row."""
    seeds = _row_seeds(generators, logits.device)  # [R]
    tokens = [0] * len(params)
    for rows, choices in _choices(logits, params):
        picked = _race(choices, seeds[rows])  # [r]
        for row, token in zip(rows.tolist(), choices.ids.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()):
            tokens[row] = token
    return tokens


def row_choices(logits: torch.Tensor, params: list[SamplingParams]) -> list[RowChoices]:
    """Each row's choices, in row order (for tests: the distribution each row samples from)."""
    out: list[RowChoices | None] = [None] * len(params)
    for rows, choices in _choices(logits, params):
        for i, row in enumerate(rows.tolist()):
            out[row] = RowChoices(choices.ids[i : i + 1], choices.probs[i : i + 1], choices.whole_vocabulary)
    return out


def _choices(logits: torch.Tensor, params: list[SamplingParams]) -> list[tuple[torch.Tensor, RowChoices]]:
    """Groups of rows (their indices [r]) with their choices: rows that keep every token past min_p
    over the whole vocabulary, rows whose nucleus lies among the candidates, and the rest the plain way."""
    device = logits.device
    scaled = logits.float() / torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)  # [R, V]
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps everything
        floor = scaled.max(dim=-1).values + torch.log(min_p)  # [R]
        scaled = scaled.masked_fill(scaled < floor.unsqueeze(1), float("-inf"))
    vocab = scaled.shape[1]
    restricted = torch.tensor([p.top_p < 1.0 or 0 < p.top_k < vocab for p in params], device=device)
    groups: list[tuple[torch.Tensor, RowChoices]] = []
    whole = torch.nonzero(~restricted).squeeze(1)
    if len(whole):
        ids = torch.arange(vocab, device=device).expand(len(whole), vocab)
        groups.append((whole, RowChoices(ids, torch.softmax(scaled[whole], dim=-1), whole_vocabulary=True)))
    nucleus = torch.nonzero(restricted).squeeze(1)
    if len(nucleus):
        groups.extend(_nucleus(scaled[nucleus], [params[i] for i in nucleus.tolist()], nucleus))
    return groups


def _nucleus(scaled: torch.Tensor, params: list[SamplingParams], rows: torch.Tensor) -> list[tuple[torch.Tensor, RowChoices]]:
    """scaled: [r, V] logits after temperature and min_p, of rows with a top_k or top_p: their
    nucleus among the likeliest CANDIDATE_TIERS[0] tokens, else among the next tier's, else the plain way."""
    groups: list[tuple[torch.Tensor, RowChoices]] = []
    left = torch.arange(len(params), device=scaled.device)  # positions in scaled not yet served
    for width in CANDIDATE_TIERS:
        if not len(left):
            return groups
        held, choices = _among_likeliest(scaled[left], [params[i] for i in left.tolist()], width)
        inside = torch.nonzero(held).squeeze(1)
        if len(inside):
            groups.append((rows[left[inside]], RowChoices(choices.ids[inside], choices.probs[inside])))
        left = left[~held]
    vocab = scaled.shape[1]
    for i in left.tolist():  # a flat distribution: the whole vocabulary sorted
        p = params[i]
        plain = apply_top_p(apply_top_k(scaled[i], p.top_k), p.top_p)
        groups.append((rows[i : i + 1], RowChoices(torch.arange(vocab, device=scaled.device).unsqueeze(0), torch.softmax(plain, -1).unsqueeze(0),
                                                   whole_vocabulary=True)))
    return groups


def _among_likeliest(scaled: torch.Tensor, params: list[SamplingParams], width: int) -> tuple[torch.Tensor, RowChoices]:
    """scaled: [r, V] -> whether each row's nucleus lies among its `width` likeliest tokens ([r]
    bool), and the choices there (exact for the rows where it does)."""
    device, vocab = scaled.device, scaled.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)  # [r]
    top_p = torch.tensor([p.top_p for p in params], device=device)  # [r]
    width = min(vocab, max(width, max(p.top_k for p in params)))
    values, ids = torch.topk(scaled, width, dim=-1)  # [r, C], likeliest first
    probs = torch.exp(values - torch.logsumexp(scaled, dim=-1, keepdim=True))  # [r, C] of the whole row's mass
    probs = probs.masked_fill(torch.arange(width, device=device).unsqueeze(0) >= top_k.unsqueeze(1), 0.0)
    # top_p is taken of what top_k left: all of it among the candidates where top_k cut, else the whole row
    mass = torch.where(top_k < vocab, probs.sum(dim=-1), torch.ones_like(top_p))  # [r]
    before = probs.cumsum(dim=-1) - probs  # [r, C] mass ahead of each candidate
    threshold = (top_p * mass).unsqueeze(1)  # [r, 1]
    reached = before[:, -1] + probs[:, -1] >= threshold.squeeze(1)  # the candidates hold top_p of the mass
    # a token is dropped once the mass ahead of it reaches top_p (the first always stays)
    probs = probs.masked_fill(before >= threshold, 0.0)
    # held: top_k cut within the candidates, they reach top_p, or none past them survives min_p
    held = (top_k < vocab) | reached | (probs[:, -1] == 0)
    return held, RowChoices(ids, probs)


def _race(choices: RowChoices, seeds: torch.Tensor) -> torch.Tensor:
    """seeds: [r] -> [r] a position of each row's choices drawn in proportion to its mass: the
    largest probs / Exp(1) (the exponential race). Each token's number comes from the row's seed
    and the token's id alone, so logits that differ by rounding (a batch of another size, bf16
    products) rarely change the winner, however they reorder the tokens. A row of more than
    RACE_HEAD tokens first picks between its likeliest RACE_HEAD and the rest, by their masses,
    so that most draws race a few hundred tokens."""
    probs, ids = choices.probs, choices.ids
    if probs.shape[1] <= RACE_HEAD:
        return torch.argmax(probs / _exponentials(seeds, ids), dim=-1)
    top_probs, top_positions = torch.topk(probs, RACE_HEAD, dim=-1)  # [r, H]
    stage = _exponentials(seeds, torch.full_like(seeds, -1).unsqueeze(1)).squeeze(1)  # [r]: a number no token uses
    in_head = (1.0 - torch.exp(-stage)) * probs.sum(dim=-1) < top_probs.sum(dim=-1)  # a uniform below the head's share
    picked = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    inside = torch.nonzero(in_head).squeeze(1)
    if len(inside):
        head_ids = ids[inside].gather(1, top_positions[inside])
        won = torch.argmax(top_probs[inside] / _exponentials(seeds[inside], head_ids), dim=-1)
        picked[inside] = top_positions[inside].gather(1, won.unsqueeze(1)).squeeze(1)
    outside = torch.nonzero(~in_head).squeeze(1)
    if len(outside):
        tail = probs[outside].scatter(1, top_positions[outside], 0.0)
        # a whole vocabulary in order: a generator's numbers, position by position, are keyed by
        # token id too, and cost a quarter of hashing every id
        numbers = _vocabulary_exponentials(seeds[outside], tail.shape[1]) if choices.whole_vocabulary \
            else _exponentials(seeds[outside], ids[outside])
        picked[outside] = torch.argmax(tail / numbers, dim=-1)
    return picked


def _vocabulary_exponentials(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds: [r] -> [r, vocab] Exp(1) numbers from a generator seeded with each row's seed."""
    numbers = torch.empty(len(seeds), vocab, device=seeds.device)
    for row, seed in enumerate(seeds.tolist()):
        numbers[row].exponential_(generator=torch.Generator(device=seeds.device).manual_seed(seed))
    return numbers


# splitmix64's constants, as the signed 64-bit integers torch holds
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _exponentials(seeds: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """seeds: [r] int64, keys: [r, C] int64 -> [r, C] float64 Exp(1) numbers, each a function of its
    row's seed and its key alone (splitmix64 of seed + (key + 1) * golden ratio): a counter-based
    draw, the same on any device and whatever else the row holds."""
    x = seeds.unsqueeze(1) + (keys + 1) * _GOLDEN  # wraps around, as splitmix64's state does
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    x = x ^ _shift_right(x, 31)
    uniform = (_shift_right(x, 11).double() + 0.5) / 2.0**53  # (0, 1)
    return -torch.log(uniform)


def _row_seeds(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One 62-bit seed per row for this draw: a seeded row's from its own (CPU) generator."""
    seeds = torch.randint(0, 2**62, (len(generators),))
    for row, generator in enumerate(generators):
        if generator is not None:
            seeds[row] = torch.randint(0, 2**62, (1,), generator=generator)
    return seeds.to(device)
