"""The datastore: documents split into sequences, their embeddings, a Faiss index and a SQLite store."""

from ttserve.datastore.build import add_to_datastore, build_datastore
from ttserve.datastore.docstore import StoredSequence
from ttserve.datastore.manifest import Manifest
from ttserve.datastore.sources import CorpusError, Document, read_corpus
from ttserve.datastore.store import Datastore, EmbedderMismatchError

__all__ = [
    "CorpusError",
    "Datastore",
    "Document",
    "EmbedderMismatchError",
    "Manifest",
    "StoredSequence",
    "add_to_datastore",
    "build_datastore",
    "read_corpus",
]
