from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.engine.murmur2 import murmur2, partition_for_key
from pigeon.errors import InvalidConfigError

# Kafka's own expectations: UtilsTest.testMurmur2 in apache/kafka
# (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java).
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

# librdkafka's unittest_murmur2 (src/rdmurmur2.c), whose table is labelled as the Java
# implementation's results; it covers the empty key and every tail length.
_UNALIGNED = b"PreAmbleWillBeRemoved,ThePrePartThatIs"
LIBRDKAFKA_VECTORS = {
    b"kafka": 0xD067CF64,
    b"giberish123456789": 0x8F552B0C,
    b"1234": 0x9FC97B14,
    b"234": 0xE7C009CA,
    b"34": 0x873930DA,
    b"4": 0x5A4B5CA1,
    _UNALIGNED: 0x78424F1C,
    _UNALIGNED[1:]: 0x4A62B377,
    _UNALIGNED[2:]: 0xE0E4E09E,
    _UNALIGNED[3:]: 0x62B8B43F,
    b"": 0x106E08D9,
}


@pytest.mark.parametrize(("data", "expected"), KAFKA_VECTORS.items())
def test_matches_kafka_utils_test(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@pytest.mark.parametrize(("data", "unsigned"), LIBRDKAFKA_VECTORS.items())
def test_matches_librdkafka_java_table(data: bytes, unsigned: int) -> None:
    assert murmur2(data) & 0xFFFFFFFF == unsigned


def _int32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _reference(data: bytes) -> int:
    """A deliberately naive transliteration: signed int32 after every step, like Java."""
    m = 0x5BD1E995
    h = _int32(0x9747B28C ^ len(data))
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = _int32(k * m)
        k = _int32(k ^ ((k & 0xFFFFFFFF) >> 24))
        k = _int32(k * m)
        h = _int32(h * m)
        h = _int32(h ^ k)
    rest = data[4 * n4 :]
    if rest:
        for i in range(len(rest) - 1, -1, -1):
            h = _int32(h ^ (rest[i] << (8 * i)))
        h = _int32(h * m)
    h = _int32(h ^ ((h & 0xFFFFFFFF) >> 13))
    h = _int32(h * m)
    return _int32(h ^ ((h & 0xFFFFFFFF) >> 15))


@given(st.binary(max_size=64))
def test_agrees_with_naive_reference(data: bytes) -> None:
    assert murmur2(data) == _reference(data)


@given(st.binary(max_size=64))
def test_result_is_a_signed_32_bit_int(data: bytes) -> None:
    assert -(2**31) <= murmur2(data) < 2**31


@given(st.binary(max_size=32), st.integers(min_value=1, max_value=1000))
def test_partition_is_positive_hash_modulo_count(key: bytes, partitions: int) -> None:
    p = partition_for_key(key, partitions)
    assert 0 <= p < partitions
    assert p == (murmur2(key) & 0x7FFFFFFF) % partitions
    # The cached answer is the same one.
    assert partition_for_key(key, partitions) == p


def test_partition_uses_the_sign_bit_mask_not_abs() -> None:
    # foobar hashes negative: Kafka's toPositive masks the sign bit (abs would differ).
    h = murmur2(b"foobar")
    assert h < 0
    assert partition_for_key(b"foobar", 7) == (h & 0x7FFFFFFF) % 7
    assert (h & 0x7FFFFFFF) % 7 != abs(h) % 7


def test_single_partition_is_always_zero() -> None:
    assert partition_for_key(b"anything", 1) == 0


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_count_must_be_positive(partitions: int) -> None:
    with pytest.raises(InvalidConfigError, match="partitions must be at least 1"):
        partition_for_key(b"k", partitions)
