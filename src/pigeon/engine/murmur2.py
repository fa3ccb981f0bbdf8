"""Kafka's default partitioner hash, so keyed messages land where a Kafka client puts them.

Bit-for-bit the same as ``org.apache.kafka.common.utils.Utils.murmur2`` in Kafka's Java
client (MurmurHash2, 32-bit, seed ``0x9747b28c``): a key keeps its partition if a stream
moves between pigeon's embedded engine and a real Kafka cluster.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from ..errors import InvalidConfigError

__all__ = ["murmur2", "partition_for_key"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK = 0xFFFFFFFF

# Keys repeat heavily in practice (a customer id, an order id): a hit costs far less than
# hashing again in pure Python. Bounded, because each entry keeps its key alive.
_PARTITION_CACHE_SIZE = 8192


def murmur2(data: bytes) -> int:
    """The 32-bit MurmurHash2 of ``data`` as Java computes it: a signed int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length >> 2
    # Python ints do not wrap, so every product is masked back to 32 bits; masking after the
    # xor is equivalent to masking each operand first, which saves an operation per word.
    for k in struct.unpack_from(f"<{whole}I", data):
        k = (k * _M) & _MASK
        k ^= k >> _R
        h = ((h * _M) ^ (k * _M)) & _MASK
    tail = length & 3
    if tail:
        base = whole << 2
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


@lru_cache(maxsize=_PARTITION_CACHE_SIZE)
def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` among ``partitions``.

    ``key`` must be ``bytes`` (hashable) because answers are cached per (key, partitions).
    """
    if partitions < 1:
        raise InvalidConfigError(f"partitions must be at least 1, not {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions
