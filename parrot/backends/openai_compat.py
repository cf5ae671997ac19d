"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, a hosted API) as an engine.

Such a server has no contexts, so contexts are kept here as text: fill appends
text (a child starts from its parent's text), and generate sends the context's
whole text as one completion request and streams the answer back.
"""

from __future__ import annotations

import json

import httpx

from parrot.backends.base import BackendStats, EngineBackend, engine_gone_on
from parrot.backends.http_engine import engine_link
from parrot.engine.llm_engine import FinishReason, GeneratedToken
from parrot.errors import ContextError, UserError


class OpenAICompatibleBackend(EngineBackend):
    reports_logprobs = False  # it could ask the server for them, but names tokens by text only, not by id

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None):
        self.name = name
        self.model = model
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = engine_link(base_url, headers)
        self._contexts: dict[str, str] = {}
        self._running = 0
        self._tokens = 0

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        # nothing is computed here in any case: the prompt goes out with the generate
        if context_id not in self._contexts:
            if parent_context_id is not None and parent_context_id not in self._contexts:
                raise ContextError(f"unknown context {parent_context_id!r}")
            self._contexts[context_id] = self._contexts.get(parent_context_id, "") if parent_context_id else ""
        self._contexts[context_id] += text

    async def generate(self, context_id, sampling, priority):
        if context_id not in self._contexts:
            raise ContextError(f"unknown context {context_id!r}")
        self.refuse_logit_work(sampling)
        body = {
            "model": self.model, "prompt": self._contexts[context_id], "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": True,
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension; other servers ignore it
        # sent only where asked: a server that knows no penalties still takes the plain request
        if sampling.presence_penalty:
            body["presence_penalty"] = sampling.presence_penalty
        if sampling.frequency_penalty:
            body["frequency_penalty"] = sampling.frequency_penalty
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty  # vLLM's extension
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)  # vLLM's extension
        if sampling.min_tokens:
            body["min_tokens"] = sampling.min_tokens  # vLLM's extension
        if sampling.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
        if sampling.min_p:
            body["min_p"] = sampling.min_p  # vLLM's extension
        if sampling.allowed_token_ids:
            body["allowed_token_ids"] = list(sampling.allowed_token_ids)  # vLLM's extension
        self._running += 1
        try:
            async for token in self._stream(context_id, body):
                yield token
        finally:
            self._running -= 1

    async def _stream(self, context_id: str, body: dict):
        """The completion's pieces, one GeneratedToken each (a piece may hold several tokens). A last
        event that only says why the answer ended closes the piece before it rather than counting as
        one more: the server's own usage counts no such token."""
        held: GeneratedToken | None = None
        pieces = 0
        # refused, reset, closed mid-stream: the server is gone (its calls run again elsewhere, or 503)
        async with engine_gone_on((httpx.TransportError,), f"{self.name} at {self._http.base_url}", f"generate of {context_id}"), \
                self._http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                raise (UserError if response.status_code < 500 else RuntimeError)(
                    f"{self.name}: completion failed with {response.status_code}: {response.text[:300]}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"{self.name}: {event['error']}")
                choice = event["choices"][0]
                text = choice.get("text") or ""
                reason = choice.get("finish_reason")
                finish = (FinishReason.LENGTH if reason == "length" else FinishReason.STOP) if reason else None
                self._contexts[context_id] += text
                if held is not None and not text and finish is not None:
                    yield GeneratedToken(held.token_id, held.text, finish)
                    return
                if held is not None:
                    yield held
                self._tokens += 1
                held = GeneratedToken(pieces, text, finish)
                pieces += 1
                if finish is not None:
                    yield held
                    return
        if held is not None:
            yield GeneratedToken(held.token_id, held.text, held.finish_reason or FinishReason.STOP)
        else:
            yield GeneratedToken(0, "", FinishReason.STOP)


    async def free_context(self, context_id):
        if self._contexts.pop(context_id, None) is None:
            raise ContextError(f"unknown context {context_id!r}")

    def stats(self) -> BackendStats:
        return BackendStats(self.name, self.model, self._running, len(self._contexts), 0, 0, self._tokens)

    async def close(self):
        await self._http.aclose()
