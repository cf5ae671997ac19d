"""Structured output: generated text held to a JSON schema, a regular expression or a grammar.

Before each token of such an output, llguidance (the grammar engine vLLM and SGLang use)
says which tokens keep the text within the grammar; the sampler masks the others out, so
greedy and sampled choices alike can only take allowed tokens. The output ends when the
grammar is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

import torch

from parrot.errors import SamplingError

MAX_SPEC_CHARS = 100_000
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: any JSON object


class StructureKind(Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    LARK = "lark"  # llguidance's Lark dialect, or GBNF (llama.cpp's, as vLLM's `grammar` takes it), converted


@dataclass(frozen=True)
class StructuredOutput:
    """What an output's text must match. resume_text: text the output already holds, which the
    grammar takes in before the first token (a call run again after its engine failed)."""

    kind: StructureKind
    spec: str
    resume_text: str = ""

    def __post_init__(self) -> None:
        if not self.spec.strip():
            raise SamplingError(f"a {self.kind.value} for structured output must not be empty")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise SamplingError(f"a {self.kind.value} for structured output takes at most {MAX_SPEC_CHARS} characters")

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls(StructureKind.JSON_SCHEMA, JSON_OBJECT_SCHEMA)

    @classmethod
    def choice(cls, options: list[str]) -> "StructuredOutput":
        """Exactly one of the options (vLLM's guided_choice)."""
        if not options or not all(options):
            raise SamplingError("a choice for structured output needs at least one option, none of them empty")
        return cls(StructureKind.LARK, "start: " + " | ".join(json.dumps(option, ensure_ascii=False) for option in options))


@dataclass
class OutputGrammar:
    """One output's grammar state: which tokens may come next, and the tokens taken so far."""

    matcher: object  # llguidance.LLMatcher
    vocab_size: int  # the logits' width
    end_token_ids: tuple[int, ...]  # the tokens that end the output where the grammar is complete
    grammar_vocab_size: int  # the grammar engine's vocabulary: the tokenizer's, and the model's padding past it

    def accept(self, token_id: int) -> None:
        """Raises SamplingError where the grammar cannot go on (its engine's limits, a refused token)."""
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise SamplingError(f"structured output stopped: the grammar engine could not take token {token_id}: "
                                f"{self.matcher.get_error()}")

    def check(self) -> None:
        """Raises SamplingError where the grammar engine failed while computing the last mask (its
        limits): that mask allows only the end, which would end the output as if complete."""
        if self.matcher.is_error():
            raise SamplingError(f"structured output stopped: the grammar engine failed: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing more may follow: the output ends here."""
        return self.matcher.is_stopped()


_BITS = torch.arange(32, dtype=torch.int32)
_executor = None  # llguidance.LLExecutor: its threads fill a step's masks side by side


def _unpack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words: [G, ceil(V' / 32)] int32 bitmasks (token t is bit t % 32 of word t // 32) -> [G, V] bool;
    logits past the grammar's vocabulary stay out."""
    bits = ((words.unsqueeze(-1) >> _BITS) & 1).flatten(1).bool()  # [G, 32 * ceil(V' / 32)]
    allowed = torch.zeros(words.shape[0], vocab_size, dtype=torch.bool)
    width = min(vocab_size, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    return allowed


def allowed_masks(grammars: list[OutputGrammar]) -> torch.Tensor:
    """[G, V] bool: the tokens that keep each of one engine's grammars' text within it, computed
    together: llguidance's executor fills the bitmasks in parallel threads, one tensor op unpacks them."""
    global _executor
    import llguidance
    import llguidance.torch

    if _executor is None:
        _executor = llguidance.LLExecutor()
    words = llguidance.torch.allocate_token_bitmask(len(grammars), grammars[0].grammar_vocab_size)  # [G, W] int32
    llguidance.torch.fill_next_token_bitmask_par(_executor, [(g.matcher, row) for row, g in enumerate(grammars)], words)
    return _unpack(words, grammars[0].vocab_size)


class GrammarCompiler:
    """Compiles structured-output specs into grammars for one engine's tokenizer and vocabulary.
    The tokenizer llguidance works with is built on first use (about 0.2 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, tokenizer_vocab_size: int, end_token_ids: tuple[int, ...]):
        """vocab_size: the logits' width, which may pass the tokenizer's (padding) or fall short of it."""
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._grammar_vocab_size = max(vocab_size, tokenizer_vocab_size)
        self.end_token_ids = end_token_ids
        self._tokenizer = None

    def _llg_tokenizer(self):
        import llguidance

        if self._tokenizer is None:
            if not self.end_token_ids:
                raise SamplingError("this model names no end-of-sequence token, which a structured output ends with: "
                                    "ask without one")
            # the grammar's vocabulary holds every token the tokenizer knows, and the model's padding past it
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self._grammar_vocab_size,
                                                     eos_token=list(self.end_token_ids))
        return self._tokenizer

    def compile(self, structured: StructuredOutput, encode) -> OutputGrammar:
        """encode(text) -> token ids: for the resume text. Raises SamplingError (a user error) for a
        spec that does not compile. Can take a while for a large grammar: call it off the event loop."""
        import llguidance

        check_compiles(structured)
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar_of(structured))
        if matcher.is_error():
            raise SamplingError(f"the {structured.kind.value} for structured output does not compile: {matcher.get_error()}")
        if structured.resume_text and not matcher.consume_tokens(encode(structured.resume_text)):
            raise SamplingError(f"the output so far does not match its {structured.kind.value}: {matcher.get_error()}")
        return OutputGrammar(matcher, self.vocab_size, self.end_token_ids, self._grammar_vocab_size)


def grammar_of(structured: StructuredOutput) -> str:
    import llguidance

    try:
        if structured.kind is StructureKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(structured.spec)
        if structured.kind is StructureKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(structured.spec)
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            lark = any_to_lark(structured.spec)  # Lark as it is (a `start:` rule); GBNF (`root ::= ...`) converted
        except GbnfToLarkError as exc:
            raise SamplingError(f"the grammar for structured output is neither Lark (with a start rule) nor GBNF: {exc}") from exc
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as exc:  # a schema that is not JSON, say
        raise SamplingError(f"the {structured.kind.value} for structured output does not compile: {exc}") from exc


def check_compiles(structured: StructuredOutput) -> None:
    """Raises SamplingError for a spec the grammar engine refuses; needs no model, so a server checks
    a request's spec before any work (or a stream) starts."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar_of(structured))
    if error:
        raise SamplingError(f"the {structured.kind.value} for structured output does not compile: {error}")
