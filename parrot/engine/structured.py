"""Structured output: generated text held to a JSON schema, a regular expression or a grammar.

Before each token of such an output, llguidance (the grammar engine vLLM and SGLang use)
says which tokens keep the text within the grammar; the sampler masks the others out, so
greedy and sampled choices alike can only take allowed tokens. The output ends when the
grammar is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

import torch

from parrot.errors import SamplingError

MAX_SPEC_CHARS = 100_000
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: any JSON object


class StructureKind(Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    LARK = "lark"  # llguidance's Lark dialect (vLLM's `grammar`)


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
    vocab_size: int
    end_token_id: int  # the token that ends the output where the grammar is complete
    _bits: torch.Tensor = field(default_factory=lambda: torch.arange(32, dtype=torch.int32))

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens that keep the text within the grammar."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # [ceil(V / 32)]
        return ((words.unsqueeze(-1) >> self._bits) & 1).flatten()[: self.vocab_size].bool()  # [V]

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}, which its own mask allowed: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing more may follow: the output ends here."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles structured-output specs into grammars for one engine's tokenizer and vocabulary.
    The tokenizer llguidance works with is built on first use (about 0.2 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, end_token_id: int):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.end_token_id = end_token_id
        self._tokenizer = None

    def compile(self, structured: StructuredOutput, encode) -> OutputGrammar:
        """encode(text) -> token ids: for the resume text. Raises SamplingError (a user error) for a
        spec that does not compile."""
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self.end_token_id)
        try:
            if structured.kind is StructureKind.JSON_SCHEMA:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(structured.spec)
            elif structured.kind is StructureKind.REGEX:
                grammar = llguidance.LLMatcher.grammar_from_regex(structured.spec)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(structured.spec)
            matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        except ValueError as exc:  # a schema that is not JSON, say
            raise SamplingError(f"the {structured.kind.value} for structured output does not compile: {exc}") from exc
        if matcher.is_error():
            raise SamplingError(f"the {structured.kind.value} for structured output does not compile: {matcher.get_error()}")
        if structured.resume_text and not matcher.consume_tokens(encode(structured.resume_text)):
            raise SamplingError(f"the output so far does not match its {structured.kind.value}: {matcher.get_error()}")
        return OutputGrammar(matcher, self.vocab_size, self.end_token_id)
