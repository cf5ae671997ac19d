"""Generated tokens' log probabilities in the OpenAI API's two shapes: the legacy completions'
lists (tokens, token_logprobs, top_logprobs, text_offset) and chat's per-token entries."""

from __future__ import annotations

from dataclasses import dataclass

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
    character reads as U+FFFD, its bytes field in chat still the token's text as decoded) and
    keeps the completions shape's text offset running across a stream's chunks."""

    tokenizer: Tokenizer
    text_offset: int = 0

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, tokens: list[LoggedToken]) -> CompletionLogprobs:
        texts = [self.text(t.token_id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[t.logprobs.logprob if t.logprobs else None for t in tokens],
            top_logprobs=[{self.text(top.token_id): top.logprob for top in t.logprobs.top} if t.logprobs else None for t in tokens],
            text_offset=offsets,
        )

    def chat(self, tokens: list[LoggedToken]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> ChatTopLogprob:
            text = self.text(token_id)
            return ChatTopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(t.token_id, t.logprobs.logprob).model_dump(),
                             top_logprobs=[entry(top.token_id, top.logprob) for top in t.logprobs.top])
            for t in tokens
        ])
