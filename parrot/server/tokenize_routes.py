"""vLLM's /tokenize and /detokenize: a prompt's tokens as this server counts them (the same
encoding and chat template as its completions and chats), and text from token ids."""

from __future__ import annotations

from fastapi import FastAPI

from parrot.errors import UserError
from parrot.protocol.tokenize_api import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from parrot.server.auth import KeyStore
from parrot.server.common import tenant_key_required
from parrot.server.openai_routes import check_model_served


def add_tokenize_routes(app: FastAPI, keys: KeyStore, model: str, tokenizer, max_context: int | None) -> None:
    Tenant = tenant_key_required(keys)

    def usable(name: str | None):
        if name is not None:
            check_model_served(name, model)
        if tokenizer is None:
            raise UserError("this server has no tokenizer: its engines count tokens their own way")
        return tokenizer

    @app.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
    async def tokenize(body: TokenizeRequest, tenant: str = Tenant) -> TokenizeResponse:
        tok = usable(body.model)
        if body.messages is not None:
            messages = [m.as_chat_message() for m in body.messages]
            text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            text = body.prompt
        ids = tok.encode(text)
        strs = [tok.decode([token]) for token in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=max_context, tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest, tenant: str = Tenant) -> DetokenizeResponse:
        tok = usable(body.model)
        if any(not 0 <= t < tok.vocab_size for t in body.tokens):
            raise UserError(f"token ids must be from 0 to {tok.vocab_size - 1}, this model's vocabulary")
        return DetokenizeResponse(prompt=tok.decode(body.tokens))
