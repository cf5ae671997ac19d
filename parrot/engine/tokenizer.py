"""Tokenizer, chat template and streaming detokenization."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from parrot.errors import UserError


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class EncodedPrompt:
    token_ids: list[int]
    prefix_tokens: int  # leading tokens that lie wholly inside the shared prefix text


class Tokenizer:
    def __init__(self, model_dir: Path):
        self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_file = model_dir / "chat_template.jinja"
        template = config.get("chat_template") or (template_file.read_text() if template_file.exists() else None)
        self._chat_template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template) if template else None
        )
        self.bos_token = config.get("bos_token") if isinstance(config.get("bos_token"), str) else None
        self.eos_token = config.get("eos_token") if isinstance(config.get("eos_token"), str) else None
        # a template that renders the tools a chat offers (others never show them to the model)
        self.template_shows_tools = bool(template) and "tools" in template
        self._byte_reader = None  # llguidance's view of the vocabulary, built on first use (about 0.2 s)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizer in tokenizer.json's format (what grammar engines build their own from)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_prefix(self, text: str, prefix_chars: int) -> "EncodedPrompt":
        """Token ids of text, and how many of them lie wholly inside its first prefix_chars characters."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        inside = sum(1 for _, end in encoding.offsets if end <= prefix_chars)
        return EncodedPrompt(encoding.ids, inside)

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes. A token may hold part of a UTF-8 character, which decode shows as
        U+FFFD; llguidance reads the bytes from the vocabulary, whatever its byte encoding."""
        if token_id >= self.vocab_size:  # a model's padding past the tokenizer: no text
            return b""
        if self._byte_reader is None:
            import llguidance

            self._byte_reader = llguidance.LLTokenizer(self.to_json())
        return self._byte_reader.decode_bytes([token_id])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[ChatMessage], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """tools: the functions a chat offers, in OpenAI's shape, for templates that render them."""
        if self._chat_template is None:
            raise UserError("this model has no chat template; use a plain completion instead")
        try:
            return self._chat_template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise UserError(f"the chat template rejected these messages: {exc}") from exc


@dataclass
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that are always whole UTF-8.

    Byte-level BPE splits a character over several tokens; decoding them one by one
    gives U+FFFD. We re-decode a short window and hold back text until it is complete.
    """

    tokenizer: Tokenizer
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]
