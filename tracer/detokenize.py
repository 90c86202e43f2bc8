"""Incremental detokenization: each token's own piece of text, right across multi-byte characters.

Decoding tokens one by one breaks characters split over several byte tokens and
drops the spaces some tokenizers attach when pieces merge. Decoding a short
window and emitting only the text that grew (and only once it no longer ends in
an incomplete character) gives pieces that concatenate to the exact text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what a decoder yields for a partial UTF-8 sequence


class IncrementalDecoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: list[int] | None = None):
        """``context``: a few preceding token ids, so the first piece gets its leading space right."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""
