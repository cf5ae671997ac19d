"""Sampling settings and pure sampling functions over logits."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from parrot.engine.outputs import TokenLogprobs, TopLogprob
from parrot.engine.structured import StructuredOutput
from parrot.errors import SamplingError

MAX_TOKENS_LIMIT = 32768  # tokens one call may ask for; the model's context may allow fewer
MAX_LOGPROBS = 20  # most likely alternatives reported per generated token (OpenAI's top_logprobs limit)
MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI bounds them
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # as OpenAI bounds a token's bias: -100 bans it, 100 all but forces it
MAX_TEMPERATURE = 100.0  # the session API's bound; the OpenAI API keeps OpenAI's 2
MAX_BIASED_TOKENS = 300  # OpenAI's limit on the tokens one request biases
MAX_ALLOWED_TOKENS = 100_000  # allowed_token_ids: more than any vocabulary this engine serves would need


def check_logprobs(alternatives: int) -> None:
    if not 0 <= alternatives <= MAX_LOGPROBS:
        raise SamplingError(f"logprobs must be from 0 to {MAX_LOGPROBS} alternatives, got {alternatives}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no log probabilities; n >= 0: each generated token's, and those of the n most likely
    # tokens at its position
    logprobs: int | None = None
    # OpenAI's: subtracted from the logit of every token the output holds, once (presence) or
    # once per time it holds it (frequency); negative values favour repeats
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL's (vLLM's and transformers' repetition_penalty): the logit of every token in the prompt
    # or the output is divided by it where positive, multiplied where negative; 1 changes nothing
    repetition_penalty: float = 1.0
    structured: StructuredOutput | None = None  # a JSON schema, regex or grammar the text must match
    # vLLM's: neither the end-of-sequence token nor a stop token id is sampled before this many
    # tokens (stop strings still end the output)
    min_tokens: int = 0
    # OpenAI's: added to the named tokens' logits before sampling, as (token id, bias) pairs
    # (a mapping is taken too); the reported logprobs stay the model's
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's: a token is kept only where its probability is at least min_p times the likeliest's
    # (after temperature; 0 keeps every token)
    min_p: float = 0.0
    # vLLM's: the only tokens that may be sampled (empty: any)
    allowed_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not a sequence of one-character stops
            object.__setattr__(self, "stop", (self.stop,))
        self._check_types()
        object.__setattr__(self, "logit_bias", _token_biases(self.logit_bias))
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise SamplingError(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingError(f"temperature must be from 0 (greedy) to {MAX_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None:
            check_logprobs(self.logprobs)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise SamplingError(f"{name} must be from -{MAX_PENALTY:g} to {MAX_PENALTY:g} (0 disables it), got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise SamplingError(f"repetition_penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g} (1 disables it), "
                                f"got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must not be empty")
        self._check_token_rules()

    def _check_types(self) -> None:
        """Settings of the wrong type are refused here, with the setting's name (past this point they
        would fail inside the engine's step); numbers of other numeric types (numpy's) and sequences
        of other kinds (a range, a set) are taken as Python's."""
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise SamplingError(f"{name} must be a finite number, got {value!r}")
            put(name, float(value))
        for name, optional in (("max_tokens", False), ("top_k", False), ("min_tokens", False), ("seed", True), ("logprobs", True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            # logprobs=True is one alternative, as it always was; other settings take no booleans
            if (isinstance(value, bool) and name != "logprobs") or not isinstance(value, numbers.Integral):
                raise SamplingError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r}")
            put(name, int(value))
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if isinstance(self.stop, Mapping) or not isinstance(self.stop, Iterable):
            raise SamplingError(f"stop takes strings (a string or a sequence of them), got {self.stop!r}")
        put("stop", tuple(self.stop))
        if not all(isinstance(s, str) for s in self.stop):
            raise SamplingError(f"stop takes strings (a string or a sequence of them), got {self.stop!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if isinstance(ids, (str, Mapping)) or not isinstance(ids, Iterable):
                raise SamplingError(f"{name} takes token ids (integers), got {ids!r}")
            ids = tuple(ids)
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise SamplingError(f"{name} takes token ids (integers), got {ids!r}")
            put(name, tuple(int(t) for t in ids))
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise SamplingError(f"structured takes a StructuredOutput (StructuredOutput.json_object(), StructuredOutput(StructureKind.REGEX, "
                                f"...), ...), got {self.structured!r}")

    def _check_token_rules(self) -> None:
        if len(self.logit_bias) > MAX_BIASED_TOKENS:
            raise SamplingError(f"logit_bias names {len(self.logit_bias)} tokens; at most {MAX_BIASED_TOKENS} may be biased")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise SamplingError("logit_bias names a token twice: give each token one bias")
        for token, value in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise SamplingError(f"logit_bias maps token ids (>= 0) to biases from -{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}; "
                                    f"got {token}: {value:g}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"min_p must be from 0 to 1 (0 disables it), got {self.min_p}")
        if len(self.allowed_token_ids) > MAX_ALLOWED_TOKENS:
            raise SamplingError(f"allowed_token_ids names {len(self.allowed_token_ids)} tokens; at most {MAX_ALLOWED_TOKENS}")
        if any(token < 0 for token in self.allowed_token_ids):
            raise SamplingError("allowed_token_ids are token ids: none may be negative")
        if self.allowed_token_ids and self.structured is not None:
            raise SamplingError("allowed_token_ids and structured output both say which tokens may come: give one of them")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def shapes_tokens(self) -> bool:
        """Whether logit_bias or allowed_token_ids move a row's logits before sampling."""
        return bool(self.logit_bias or self.allowed_token_ids)

    @property
    def token_ids_named(self) -> tuple[int, ...]:
        """The token ids the settings name, which must be in the model's vocabulary."""
        return self.stop_token_ids + self.allowed_token_ids + tuple(token for token, _ in self.logit_bias)


def _token_biases(bias: Mapping | tuple) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a mapping (whose keys may be strings of
    digits, as JSON writes them) or from pairs."""
    pairs = []
    for token, value in bias.items() if isinstance(bias, Mapping) else bias:
        try:
            pairs.append((int(token), float(value)))
        except (TypeError, ValueError):
            raise SamplingError(f'logit_bias maps token ids, written as strings of digits ("50256"), to biases; '
                                f"{token!r}: {value!r} is not one") from None
    return tuple(sorted(pairs))


def apply_token_rules(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] float32 of one sequence -> the same with allowed_token_ids kept alone and
    logit_bias added (the ids are in the vocabulary: the engine checked them)."""
    if params.allowed_token_ids:
        kept = torch.full_like(logits, float("-inf"))
        ids = torch.tensor(params.allowed_token_ids, dtype=torch.int64, device=logits.device)
        logits = kept.index_copy(0, ids, logits[ids])
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias], dtype=torch.int64, device=logits.device)
        biases = torch.tensor([value for _, value in params.logit_bias], dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, biases)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits: [V]; drops the tokens less likely than min_p times the likeliest."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
    return logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits: [V]; keeps the k largest, the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits: [V]; keeps the smallest set of tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # drop a token when the mass before it already reaches p (the first always stays)
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: list[int], alternatives: list[int]) -> list[TokenLogprobs]:
    """logits: [B, V], the rows the tokens were sampled from -> each token's log probability under
    the model's distribution (before temperature, top-k and top-p: what the model thinks of the
    token, as vLLM and OpenAI report it) and the `alternatives[row]` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = torch.topk(logprobs, max(alternatives, default=0), dim=-1)  # [B, most]; most may be 0
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(chosen[row], tuple(TopLogprob(int(i), v) for i, v in zip(top_ids[row][:n], top_values[row][:n])))
        for row, n in enumerate(alternatives)
    ]


def stop_string_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of text could still begin a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


@dataclass
class StopChecker:
    """Finds stop strings in streamed text and decides what may be emitted so far."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    stopped: bool = field(default=False)

    def feed(self, delta: str) -> str:
        """Adds delta; returns the text that is safe to emit now."""
        self.text += delta
        # the earliest occurrence of any stop string ends the text (not the first stop listed)
        found = [i for stop in self.stops if (i := self.text.find(stop, max(0, self.emitted - len(stop)))) != -1]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
        safe_end = len(self.text) if self.stopped else len(self.text) - stop_string_holdback(self.text, self.stops)
        out = self.text[self.emitted : safe_end]
        self.emitted = max(self.emitted, safe_end)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
