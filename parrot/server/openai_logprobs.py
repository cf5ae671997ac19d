"""Generated tokens' log probabilities in the OpenAI API's two shapes: the legacy completions'
lists (tokens, token_logprobs, top_logprobs, text_offset) and chat's per-token entries."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from parrot.engine.outputs import PromptLogprobs
from parrot.engine.tokenizer import Tokenizer
from parrot.manager.graph import LoggedToken
from parrot.protocol.openai_api import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs


def prompt_tokens(scored: PromptLogprobs) -> list[LoggedToken]:
    """A scored prompt as logged tokens: the first without log probabilities (nothing precedes it)."""
    return [LoggedToken(token_id, logprobs) for token_id, logprobs in zip(scored.token_ids, [None, *scored.logprobs])]


@dataclass
class LogprobsWriter:
    """Names tokens by their text (each token decoded alone: one that holds part of a UTF-8
    character reads as U+FFFD; chat's bytes field holds the token's own bytes) and keeps the
    completions shape's text offsets running across a stream's chunks: each token's offset is the
    number of characters of the text before it (a character split over tokens counts once, where
    it is complete)."""

    tokenizer: Tokenizer
    text_offset: int = 0
    _characters: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, tokens: list[LoggedToken]) -> CompletionLogprobs:
        offsets = []
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(self._characters.decode(self.tokenizer.token_bytes(t.token_id)))
        return CompletionLogprobs(
            tokens=[self.text(t.token_id) for t in tokens],
            token_logprobs=[t.logprobs.logprob if t.logprobs else None for t in tokens],
            top_logprobs=[{self.text(top.token_id): top.logprob for top in t.logprobs.top} if t.logprobs else None for t in tokens],
            text_offset=offsets,
        )

    def chat(self, tokens: list[LoggedToken]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> ChatTopLogprob:
            return ChatTopLogprob(token=self.text(token_id), logprob=logprob, bytes=list(self.tokenizer.token_bytes(token_id)))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(t.token_id, t.logprobs.logprob).model_dump(),
                             top_logprobs=[entry(top.token_id, top.logprob) for top in t.logprobs.top])
            for t in tokens
        ])
