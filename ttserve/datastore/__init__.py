"""The datastore: documents split into sequences, their embeddings, a Faiss index and a SQLite store."""

from ttserve.datastore.build import add_to_datastore, build_datastore
from ttserve.datastore.candidates import Candidates, ShardFailure, ShardHits
from ttserve.datastore.docstore import StoredSequence
from ttserve.datastore.guard import DatastoreChangedError
from ttserve.datastore.manifest import Manifest, ShardsManifest, is_sharded
from ttserve.datastore.sharded import (
    LocalShard,
    ShardClient,
    ShardedDatastore,
    ShardsUnavailableError,
    open_datastore,
)
from ttserve.datastore.shards import build_sharded_datastore, shard_datastore
from ttserve.datastore.sources import CorpusError, Document, read_corpus
from ttserve.datastore.store import Datastore, EmbedderMismatchError

__all__ = [
    "Candidates",
    "CorpusError",
    "Datastore",
    "DatastoreChangedError",
    "Document",
    "EmbedderMismatchError",
    "LocalShard",
    "Manifest",
    "ShardClient",
    "ShardFailure",
    "ShardHits",
    "ShardedDatastore",
    "ShardsManifest",
    "ShardsUnavailableError",
    "StoredSequence",
    "add_to_datastore",
    "build_datastore",
    "build_sharded_datastore",
    "is_sharded",
    "open_datastore",
    "read_corpus",
    "shard_datastore",
]
