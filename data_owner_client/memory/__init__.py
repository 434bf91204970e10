"""The external memory (docs/design.md, "On-disk formats"): pairs (f(c), y) on disk for adapter
training. :mod:`~data_owner_client.memory.store` is the directory format and reads it in shuffled
batches; :mod:`~data_owner_client.memory.build` makes one through the server."""

from data_owner_client.memory.build import build_memory
from data_owner_client.memory.store import (
    DTYPES,
    FORMAT,
    IGNORE,
    MANIFEST,
    VERSION,
    Batch,
    Context,
    FingerprintMismatchError,
    Manifest,
    Memory,
    MemoryStoreError,
    Positions,
    Sampling,
    SequenceBatch,
    SequenceView,
    ShardInfo,
    check_fingerprint,
    read_manifest,
    split_batches,
    write_manifest,
    write_shard,
)

__all__ = [
    "DTYPES",
    "FORMAT",
    "IGNORE",
    "MANIFEST",
    "VERSION",
    "Batch",
    "Context",
    "FingerprintMismatchError",
    "Manifest",
    "Memory",
    "MemoryStoreError",
    "Positions",
    "Sampling",
    "SequenceBatch",
    "SequenceView",
    "ShardInfo",
    "build_memory",
    "check_fingerprint",
    "read_manifest",
    "split_batches",
    "write_manifest",
    "write_shard",
]
