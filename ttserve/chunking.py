"""Splitting text into sequences of at most `max_tokens` tokens of a given tokenizer.

Used for datastore documents (so that every stored sequence is embedded and trained on whole) and for
long prompts (so that each chunk becomes one SIFT target). Chunks are exact character spans of the
input: concatenating them gives back the original text, whitespace included.
"""

from __future__ import annotations

from typing import Any


def split_text(text: str, tokenizer: Any, max_tokens: int) -> list[str]:
    """Split `text` into consecutive chunks of at most `max_tokens` tokens (special tokens not counted)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not text:
        return []
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= max_tokens:
        return [text]
    # Cut only between words: a word cut in half re-tokenizes differently (BERT's "adapt|ers" becomes
    # "er ##s" on its own), so a chunk could exceed max_tokens when embedded or trained on.
    word_ids = encoding.word_ids() if callable(getattr(encoding, "word_ids", None)) else None
    cuts = [0]
    while cuts[-1] + max_tokens < len(offsets):
        cut = cuts[-1] + max_tokens
        if word_ids is not None:
            aligned = cut
            while (
                aligned > cuts[-1] + 1
                and word_ids[aligned] is not None
                and word_ids[aligned] == word_ids[aligned - 1]
            ):
                aligned -= 1
            if aligned > cuts[-1] + 1 or word_ids[aligned] != word_ids[aligned - 1]:
                cut = aligned  # else one word is longer than max_tokens: cut it hard
        cuts.append(cut)
    # Each chunk runs from the first character of its first token to the first character of the next
    # chunk's first token, so the whitespace between tokens stays with the earlier chunk.
    starts = [0] + [offsets[i][0] for i in cuts[1:]]
    ends = starts[1:] + [len(text)]
    return [text[s:e] for s, e in zip(starts, ends, strict=True) if e > s]


def content_tokens(tokenizer: Any, max_seq_length: int) -> int:
    """How many content tokens fit in `max_seq_length` once the tokenizer's special tokens are added."""
    specials = (
        tokenizer.num_special_tokens_to_add(pair=False)
        if hasattr(tokenizer, "num_special_tokens_to_add")
        else 0
    )
    return max(1, max_seq_length - specials)
