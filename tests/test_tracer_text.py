"""Text handling: incremental detokenization and chat formatting."""

from __future__ import annotations

from tests.conftest import CHATML, build_tokenizer
from tracer import chat
from tracer.detokenize import IncrementalDecoder

TEXT = "Café, naïve 日本語 🙂🚀 ∑ π ≈ 3.14159 — hello world"


def test_pieces_concatenate_to_the_text_and_never_split_a_character():
    tokenizer = build_tokenizer(None)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT) // 2  # byte-level: multi-byte characters span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens only completed a character later


def test_fallback_format_without_a_chat_template():
    tokenizer = build_tokenizer(None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render(tokenizer, messages, add_generation_prompt=True) == "SYSTEM: Be brief.\nUSER: Hi\nASSISTANT:"


def test_continuation_is_the_text_after_the_transcript():
    tokenizer = build_tokenizer(CHATML)
    first = [{"role": "user", "content": "Hi"}]
    rendered = chat.render(tokenizer, first, add_generation_prompt=True)
    history = [*first, {"role": "assistant", "content": "Hello!"}]
    user = {"role": "user", "content": "Why?"}
    # the reply ended with the end-of-turn token, already in the transcript
    text, full = chat.continuation(tokenizer, rendered, "Hello!", "<|im_end|>", history, user)
    assert rendered + "Hello!" + "<|im_end|>" + text == full
    # cut short (no end-of-turn token yet): the template's closing is fed too
    text, full = chat.continuation(tokenizer, rendered, "Hello!", None, history, user)
    assert rendered + "Hello!" + text == full and text.startswith("<|im_end|>")
