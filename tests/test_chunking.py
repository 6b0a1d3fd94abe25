"""Splitting text into sequences that fit a token budget, losing nothing."""

from __future__ import annotations

import pytest

from ttserve.chunking import content_tokens, split_text


@pytest.mark.parametrize("max_tokens", [1, 7, 32, 254])
def test_chunks_reassemble_and_fit(embedder, max_tokens):
    text = (
        "  Leading space.\n\n"
        + " ".join(f"word{i} tokenization-heavy_identifier{i}()" for i in range(120))
        + "\ntrailing \n"
    )
    chunks = split_text(text, embedder.tokenizer, max_tokens)
    assert "".join(chunks) == text
    counts = [len(embedder.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    # Cuts fall between words; only a single word longer than the budget may be cut inside.
    assert max(counts) <= max(max_tokens, 12)
    if max_tokens >= 32:
        assert max(counts) <= max_tokens


def test_short_and_empty_text(embedder):
    assert split_text("short text", embedder.tokenizer, 10) == ["short text"]
    assert split_text("", embedder.tokenizer, 10) == []
    with pytest.raises(ValueError):
        split_text("x", embedder.tokenizer, 0)


def test_content_tokens_leave_room_for_special_tokens(embedder):
    assert content_tokens(embedder.tokenizer, 256) == 254  # [CLS] and [SEP]
    assert embedder.max_tokens == 254


def test_query_chunks_keep_the_end(embedder):
    text = " ".join(f"part{i}" for i in range(2000))
    chunks = embedder.split(text)
    assert len(chunks) > 3
    targets = embedder.encode_query(text, max_chunks=2)
    assert targets.shape == (2, embedder.dimension)
    expected = embedder.encode(chunks[-2:])
    assert abs(targets - expected).max() < 1e-5
