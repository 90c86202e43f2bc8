"""Chat formatting: the tokenizer's chat template when it has one, otherwise ``USER: … ASSISTANT:``.

A multi-turn session never re-tokenizes what the model already holds: each new
turn is the *text that follows* the transcript (the end of the previous reply as
the template writes it, then the new user message and the assistant header).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

FALLBACK_ROLES = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}


def has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The conversation as the model reads it, as text (special tokens written out)."""
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].upper())}: {m['content']}\n" for m in messages]
    return "".join(lines) + ("ASSISTANT:" if add_generation_prompt else "")


def encode(tokenizer: PreTrainedTokenizerBase, text: str, *, first: bool) -> list[int]:
    """Token ids of ``text``; templates write their own BOS, the fallback lets the tokenizer add it."""
    add_special = first and not has_template(tokenizer)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _after(text: str, prefix: str) -> str | None:
    return text[len(prefix) :] if text.startswith(prefix) else None


def continuation(
    tokenizer: PreTrainedTokenizerBase,
    rendered: str,
    reply: str,
    pending_eos_text: str | None,
    history: list[Message],
    user: Message,
) -> tuple[str, str]:
    """Text to feed after the transcript for a new user turn, and the new full rendering.

    ``rendered`` is the rendering the transcript's prompt came from, ``reply``
    the assistant text generated after it, ``history`` the chat including that
    reply. ``pending_eos_text`` is the end-of-turn token already in the
    transcript (as text), which the template's closing must not repeat.
    """
    with_reply = render(tokenizer, history, add_generation_prompt=False)
    closing = _after(with_reply, rendered)
    if closing is not None:
        for written in (reply, reply.strip()):
            rest = _after(closing, written)
            if rest is not None:
                closing = rest
                break
        else:
            closing = ""
    else:
        closing = ""
    if pending_eos_text and closing.startswith(pending_eos_text):
        closing = closing[len(pending_eos_text) :]
    full = render(tokenizer, [*history, user], add_generation_prompt=True)
    opening = _after(full, with_reply)
    if opening is None:  # a template that rewrites earlier turns: fall back to the new turn on its own
        opening = render(tokenizer, [user], add_generation_prompt=True)
    return closing + opening, full
