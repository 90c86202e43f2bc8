"""Token text: what a token's piece *is* (stored in files), and how it is *shown* (one rule, everywhere).

Stored text is the tokenizer's own decoding of the single token. A token that
is only part of a multi-byte character has no text of its own (decoders give
``\\ufffd``); its bytes are written as ``<0xE2>`` escapes instead, so nothing
is lost and two fragments never look alike.

Shown text (``visible``) makes whitespace and control characters visible, so a
token is always one printable line and a crafted file cannot send escape
sequences to the terminal. The CLI, ``--print`` and the app all use it.
"""

from __future__ import annotations

from functools import lru_cache

REPLACEMENT = "\ufffd"
_VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥"}


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character a byte-level BPE vocabulary uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_bytes(vocab_piece: str) -> bytes | None:
    """The bytes behind a vocabulary entry (byte-level BPE or ``<0xNN>`` byte fallback); None if unknown."""
    if vocab_piece.startswith("<0x") and vocab_piece.endswith(">") and len(vocab_piece) == 6:
        try:
            return bytes([int(vocab_piece[3:5], 16)])
        except ValueError:
            return None
    alphabet = _byte_level_alphabet()
    if vocab_piece and all(ch in alphabet for ch in vocab_piece):
        return bytes(alphabet[ch] for ch in vocab_piece)
    return None


def escape_fragments(data: bytes) -> str:
    """Decode UTF-8, writing every byte that is not part of a whole character as ``<0xNN>``."""
    text = data.decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(ch) - 0xDC00:02X}>" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in text)


def stored_piece(decoded: str, vocab_piece: str | None) -> str:
    """The text stored for a token: its decoding, or byte escapes when it is part of a character."""
    if REPLACEMENT not in decoded or vocab_piece is None:
        return decoded
    data = token_bytes(vocab_piece)
    return decoded if data is None else escape_fragments(data)


def token_piece(tokenizer, token_id: int) -> str:
    """The stored text of token ``token_id`` on its own, from a transformers tokenizer."""
    decoded = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return stored_piece(decoded, tokenizer.convert_ids_to_tokens(token_id))


def visible(text: str) -> str:
    """One printable line for a token piece: ``∅`` for nothing, ``␣`` for bare spaces, ``⏎`` for newlines."""
    if text == "":
        return "∅"
    if text.isspace():
        text = text.replace(" ", "␣")
    return "".join(_VISIBLE.get(ch) or _control(ch) or ch for ch in text)


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """Text from a file made safe for a terminal: control characters shown, not sent (newlines kept if asked)."""
    return "".join(ch if keep_newlines and ch == "\n" else _VISIBLE.get(ch) or _control(ch) or ch for ch in text)


def _control(ch: str) -> str | None:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode "control pictures" block: ␛ for ESC
    if code == 0x7F:
        return "␡"
    if 0x80 <= code < 0xA0 or code in (0x2028, 0x2029):
        return f"\\u{code:04x}"
    return None
