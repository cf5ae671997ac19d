"""Payloads of vLLM's /tokenize and /detokenize, which clients use to count and cut prompts."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from parrot.protocol.manager_api import MAX_VALUE_CHARS
from parrot.protocol.openai_api import ChatMessageBody, Lenient

MAX_TOKENS_TO_DETOKENIZE = 1_000_000


class TokenizeRequest(Lenient):
    """A completion's prompt or a chat's messages (rendered by the chat template, as a chat request
    would render them), to be counted as this server counts them."""

    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_VALUE_CHARS)
    messages: list[ChatMessageBody] | None = None
    add_generation_prompt: bool = True  # messages: end with the assistant's turn opened, as a chat request does
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of_prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt (a completion's text) or messages (a chat), one of them")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None  # the model's context in tokens, where known
    tokens: list[int]
    token_strs: list[str] | None = None  # each token's own text, where asked


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TOKENS_TO_DETOKENIZE)


class DetokenizeResponse(BaseModel):
    prompt: str
