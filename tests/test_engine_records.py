"""The bulk-publish record encoder writes exactly the bytes the general encoder writes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pigeon.engine.records import encode_plain_records, encode_record

subjects = st.from_regex(r"[a-z]{1,8}(\.[a-z0-9]{1,8}){0,3}", fullmatch=True)


@given(subjects, st.integers(0, 300), st.lists(st.binary(max_size=40), min_size=1, max_size=20))
def test_payloads_of_one_size_encode_as_the_general_encoder_does(
    subject: str, size: int, seeds: list[bytes]
) -> None:
    payloads = [(seed * size)[:size].ljust(size, b"-") for seed in seeds]
    assert encode_plain_records(subject, payloads) == [
        encode_record(subject, p, None, None, None) for p in payloads
    ]


@given(subjects, st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_payloads_of_mixed_sizes_encode_as_the_general_encoder_does(
    subject: str, payloads: list[bytes]
) -> None:
    assert encode_plain_records(subject, payloads) == [
        encode_record(subject, p, None, None, None) for p in payloads
    ]
