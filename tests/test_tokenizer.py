"""Tokenizer, streaming detokenization and the chat template (tokenizer files only, no weights)."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parrot.engine.tokenizer import ChatMessage, IncrementalDetokenizer, Tokenizer
from parrot.errors import UserError

MULTILINGUAL = [
    "Parrots 🦜 say héllo",
    "日本語のテキスト",
    "👨‍👩‍👧 family, 🇫🇷 flag",
    "naïve café — “quotes” and Ελληνικά, русский, العربية",
    "plain ascii text, nothing special",
]


def stream_deltas(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(token) for token in ids]


def test_encode_decode_round_trip(tokenizer):
    for text in MULTILINGUAL:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_streamed_deltas_are_whole_utf8(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream_deltas(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas), f"a delta carried half a character: {deltas!r}"


def test_a_character_split_over_tokens_comes_out_when_complete(tokenizer):
    ids = tokenizer.encode("🦜")
    assert len(ids) > 1, "the parrot emoji is several byte-level tokens"
    deltas = stream_deltas(tokenizer, ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🦜"


def test_streaming_after_a_prompt_only_shows_new_text(tokenizer):
    # the engine streams the generated tokens only; a stream may start mid-word
    prompt, answer = tokenizer.encode("Once upon"), tokenizer.encode(" a time 🦜 in Köln")
    deltas = stream_deltas(tokenizer, answer)
    assert "".join(deltas) == tokenizer.decode(answer)
    assert tokenizer.decode(prompt + answer) == tokenizer.decode(prompt) + "".join(deltas)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("ab ,.\néü€日本🦜👍😀ЖΩ")), max_size=24))
def test_streaming_property(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream_deltas(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


# ---- chat template ------------------------------------------------------------------


def test_chat_template_renders_a_conversation(tokenizer):
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "Bye"),
    ]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(rendered)
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 5, "role markers are single special tokens"


def test_chat_template_default_system_prompt_and_generation_prompt(tokenizer):
    with_prompt = tokenizer.apply_chat_template([ChatMessage("user", "Hi")])
    without = tokenizer.apply_chat_template([ChatMessage("user", "Hi")], add_generation_prompt=False)
    assert with_prompt.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>\n" in with_prompt
    assert with_prompt == without + "<|im_start|>assistant\n"


def test_model_without_chat_template_says_so(model_dir, tmp_path):
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    plain = Tokenizer(tmp_path)
    assert plain.encode("hello") == Tokenizer(model_dir).encode("hello")
    with pytest.raises(UserError, match="chat template"):
        plain.apply_chat_template([ChatMessage("user", "Hi")])


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_logprobs_name_each_tokens_own_bytes_and_offsets_into_the_text(tokenizer, text):
    """Chat's bytes fields join into the text, where a token holds part of a character; the
    completions' text offsets count the characters of the text before each token."""
    from parrot.engine.outputs import TokenLogprobs
    from parrot.manager.graph import LoggedToken
    from parrot.server.openai_logprobs import LogprobsWriter

    ids = tokenizer.encode(text)
    tokens = [LoggedToken(token_id, TokenLogprobs(-1.0)) for token_id in ids]
    chat = LogprobsWriter(tokenizer).chat(tokens)
    assert bytes(b for entry in chat.content for b in entry.bytes).decode() == text
    writer = LogprobsWriter(tokenizer)
    offsets = writer.completion(tokens[:2]).text_offset + writer.completion(tokens[2:]).text_offset  # as a stream's chunks
    complete = [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]  # characters whole before token i
    assert offsets == complete and writer.text_offset == len(text)
