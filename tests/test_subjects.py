from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.errors import InvalidSubjectError
from pigeon.subjects import (
    MAX_SUBJECT_BYTES,
    SubjectIndex,
    matches,
    patterns_overlap,
    validate_pattern,
    validate_subject,
)

# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["a", "orders.created", "a.b.c.d", "ünï.cödé", "A-1_b:c"])
def test_valid_subjects_are_returned(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert validate_pattern(subject) == subject


@pytest.mark.parametrize("pattern", ["*", ">", "a.*", "a.>", "*.b.>", "*.*", "a.*.c"])
def test_valid_patterns_are_returned(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


# (input, regex the message must match); each applies to subjects and patterns alike.
COMMON_ERRORS: list[tuple[Any, str]] = [
    (123, r"123: must be a str, not int"),
    (b"a.b", r"b'a\.b': must be a str, not bytes"),
    (None, r"must be a str, not NoneType"),
    ("", r"'': empty"),
    ("orders..created", r"'orders\.\.created': empty token at position 2"),
    (".orders", r"empty token at position 1"),
    ("orders.", r"empty token at position 2"),
    ("a b", r"whitespace or control character ' ' at index 1"),
    ("a.b\t", r"whitespace or control character '\\t' at index 3"),
    ("a\nb", r"whitespace or control character '\\n'"),
    ("a\x00b", r"whitespace or control character '\\x00'"),
    ("a\x7fb", r"whitespace or control character '\\x7f'"),
    ("a\u00a0b", r"whitespace or control character '\\xa0'"),
    ("a\u2003b", r"whitespace or control character '\\u2003'"),
    ("a\ud800b", r"whitespace or control character '\\ud800'"),
    ("a" * (MAX_SUBJECT_BYTES + 1), r"1025 bytes, over the 1024-byte limit"),
    ("é" * 513, r"1026 bytes, over the 1024-byte limit"),
]


@pytest.mark.parametrize(("bad", "message"), COMMON_ERRORS)
def test_subject_errors(bad: Any, message: str) -> None:
    with pytest.raises(InvalidSubjectError, match=r"^invalid subject .*" + message):
        validate_subject(bad)


@pytest.mark.parametrize(("bad", "message"), COMMON_ERRORS)
def test_pattern_errors(bad: Any, message: str) -> None:
    with pytest.raises(InvalidSubjectError, match=r"^invalid subject pattern .*" + message):
        validate_pattern(bad)


def test_exact_message_for_double_dot() -> None:
    with pytest.raises(InvalidSubjectError) as info:
        validate_subject("orders..created")
    assert str(info.value) == (
        "invalid subject 'orders..created': empty token at position 2 "
        "(leading, trailing or double '.')"
    )


def test_length_limit_is_inclusive_and_counts_bytes() -> None:
    assert validate_subject("a" * MAX_SUBJECT_BYTES)
    assert validate_pattern("é" * (MAX_SUBJECT_BYTES // 2))


def test_long_subject_is_shortened_in_message() -> None:
    with pytest.raises(InvalidSubjectError) as info:
        validate_subject("x" * 5000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("subject", "token", "position"),
    [
        ("orders.*", "*", 2),
        (">", ">", 1),
        ("a.>", ">", 2),
        ("foo*.b", "foo*", 1),
        ("a.b>", "b>", 2),
    ],
)
def test_literal_subject_rejects_wildcards(subject: str, token: str, position: int) -> None:
    with pytest.raises(
        InvalidSubjectError,
        match=rf"wildcard in token '{re.escape(token)}' at position {position}; "
        "a published subject must be literal",
    ):
        validate_subject(subject)


@pytest.mark.parametrize(
    ("pattern", "token", "position"),
    [("foo*", "foo*", 1), ("a.b>", "b>", 2), ("a.**", "**", 2), ("a.>>", ">>", 2), ("*>", "*>", 1)],
)
def test_pattern_rejects_partial_wildcard_tokens(pattern: str, token: str, position: int) -> None:
    with pytest.raises(
        InvalidSubjectError,
        match=rf"token '{re.escape(token)}' at position {position} mixes a "
        "wildcard with other characters",
    ):
        validate_pattern(pattern)


@pytest.mark.parametrize(("pattern", "position"), [(">.a", 1), ("a.>.b", 2), ("a.>.>", 2)])
def test_pattern_rejects_gt_before_the_end(pattern: str, position: int) -> None:
    with pytest.raises(
        InvalidSubjectError, match=rf"'>' at position {position} must be the last token"
    ):
        validate_pattern(pattern)


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from("ab.*> \t\x00é"), max_size=12))
def test_every_rejection_is_diagnosed(text: str) -> None:
    # Valid input takes a regex fast path; anything else must get a specific message
    # (the diagnosis raises AssertionError if it finds no reason).
    for validate in (validate_subject, validate_pattern):
        try:
            assert validate(text) == text
        except InvalidSubjectError as error:
            assert str(error).startswith("invalid subject")
    # A literal subject is always a valid pattern.
    try:
        validate_subject(text)
    except InvalidSubjectError:
        return
    assert validate_pattern(text) == text


def test_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_subject("")


# --- matches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "x.b", True),
        ("*", "x", True),
        ("*", "x.y", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.c.>", "a.x.c.d.e", True),
        ("a.*.c.>", "a.x.d.d.e", False),
    ],
)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


def test_matches_validates_its_arguments() -> None:
    with pytest.raises(InvalidSubjectError, match="must be literal"):
        matches("a.*", "a.*")
    with pytest.raises(InvalidSubjectError, match="must be the last token"):
        matches("a.>.b", "a.b.b")


# --- patterns_overlap ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "*.b", True),
        ("a.*", "b.*", False),
        ("a.*", "a.*.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "*.x", True),
        (">", "anything.at.all", True),
        ("a.b.>", "a.*.c", True),
        ("a.b.>", "a.c.>", False),
        ("*.*", "*", False),
        ("*.>", "a", False),
    ],
)
def test_patterns_overlap(a: str, b: str, expected: bool) -> None:
    assert patterns_overlap(a, b) is expected
    assert patterns_overlap(b, a) is expected


def test_patterns_overlap_validates() -> None:
    with pytest.raises(InvalidSubjectError, match="empty token"):
        patterns_overlap("a..b", "a")


# Small alphabet so that random patterns and subjects collide often.
_TOKENS = ["a", "b", "c"]
literal_tokens = st.sampled_from(_TOKENS)
subjects = st.lists(literal_tokens, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from([*_TOKENS, "*"]), min_size=1, max_size=5))
    if draw(st.booleans()):
        tokens[-1] = ">"
    return ".".join(tokens)


def _all_subjects(max_tokens: int) -> list[str]:
    """Every subject of up to ``max_tokens`` tokens over the alphabet plus a fresh 'z'."""
    level = [""]
    result: list[str] = []
    for _ in range(max_tokens):
        level = [f"{s}.{t}" if s else t for s in level for t in [*_TOKENS, "z"]]
        result.extend(level)
    return result


_ALL_SUBJECTS = _all_subjects(6)


@settings(max_examples=300)
@given(patterns(), patterns())
def test_overlap_agrees_with_brute_force(a: str, b: str) -> None:
    # Patterns have at most 5 tokens, so a common subject (if any) exists with at most 6.
    brute = any(matches(a, s) and matches(b, s) for s in _ALL_SUBJECTS)
    assert patterns_overlap(a, b) is brute


@given(patterns(), subjects)
def test_matches_agrees_with_regex_translation(pattern: str, subject: str) -> None:
    parts = []
    for token in pattern.split("."):
        parts.append({"*": r"[^.]+", ">": r"[^.]+(?:\.[^.]+)*"}.get(token, re.escape(token)))
    assert matches(pattern, subject) is bool(re.fullmatch(r"\.".join(parts), subject))


# --- SubjectIndex ----------------------------------------------------------------------


def test_index_basic() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("orders.*", "star")
    index.add("orders.>", "gt")
    index.add("orders.created", "exact")
    index.add(">", "all")
    assert len(index) == 4
    assert Counter(index.match("orders.created")) == Counter(["star", "gt", "exact", "all"])
    assert Counter(index.match("orders.eu.created")) == Counter(["gt", "all"])
    assert Counter(index.match("orders")) == Counter(["all"])
    assert index.match("users.created") == ("all",)


def test_index_returns_tuple() -> None:
    index: SubjectIndex[int] = SubjectIndex()
    index.add("a", 1)
    assert isinstance(index.match("a"), tuple)
    assert index.match("b") == ()


def test_index_counts_each_registration() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.b", "x")
    index.add("a.b", "x")
    index.add("a.*", "x")
    assert len(index) == 3
    assert Counter(index.match("a.b")) == Counter({"x": 3})
    assert index.remove("a.b", "x")
    assert Counter(index.match("a.b")) == Counter({"x": 2})


def test_index_remove() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.>", "v")
    assert not index.remove("a.>", "other")
    assert not index.remove("a.*", "v")
    assert not index.remove("a.b.c", "v")
    assert len(index) == 1
    assert index.remove("a.>", "v")
    assert not index.remove("a.>", "v")
    assert len(index) == 0
    assert index.match("a.b") == ()


def test_index_prunes_empty_nodes() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.b.c.d", "v")
    index.add("a.x", "w")
    index.remove("a.b.c.d", "v")
    root = index._root
    assert list(root.children) == ["a"]
    assert list(root.children["a"].children) == ["x"]
    index.remove("a.x", "w")
    assert root.children == {}


def test_cache_is_invalidated_by_add_and_remove() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.*", "first")
    assert index.match("a.b") == ("first",)
    assert index.match("a.b") == ("first",)  # now served from the cache
    index.add("a.b", "second")
    assert Counter(index.match("a.b")) == Counter(["first", "second"])
    index.remove("a.*", "first")
    assert index.match("a.b") == ("second",)
    # A cached empty answer is invalidated too.
    assert index.match("z") == ()
    index.add(">", "all")
    assert index.match("z") == ("all",)


def test_cache_is_bounded_lru() -> None:
    index: SubjectIndex[str] = SubjectIndex(cache_size=2)
    index.add(">", "v")
    index.match("a")
    index.match("b")
    index.match("a")  # refreshes 'a', so 'b' is the least recently used
    index.match("c")
    assert list(index._cache) == ["a", "c"]


def test_cache_can_be_disabled() -> None:
    index: SubjectIndex[str] = SubjectIndex(cache_size=0)
    index.add("a", "v")
    assert index.match("a") == ("v",)
    assert not index._cache
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        SubjectIndex(cache_size=-1)


def test_index_validates() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    with pytest.raises(InvalidSubjectError, match="must be the last token"):
        index.add("a.>.b", "v")
    with pytest.raises(InvalidSubjectError, match="empty token"):
        index.remove("a..b", "v")
    with pytest.raises(InvalidSubjectError, match="a published subject must be literal"):
        index.match("a.*")
    with pytest.raises(InvalidSubjectError, match="must be a str, not list"):
        index.match(["a"])  # type: ignore[arg-type]
    # A rejected subject is not cached as if it matched nothing.
    with pytest.raises(InvalidSubjectError, match="a published subject must be literal"):
        index.match("a.*")
    assert len(index) == 0


@settings(max_examples=200)
@given(
    st.lists(st.tuples(patterns(), st.integers(0, 5)), max_size=30),
    st.lists(subjects, min_size=1, max_size=20),
    st.data(),
)
def test_index_agrees_with_brute_force(
    registrations: list[tuple[str, int]], probes: list[str], data: st.DataObject
) -> None:
    index: SubjectIndex[int] = SubjectIndex(cache_size=8)
    live: list[tuple[str, int]] = []

    def check() -> None:
        for subject in probes:
            expected = Counter(v for p, v in live if matches(p, subject))
            assert Counter(index.match(subject)) == expected
            assert len(index) == len(live)

    for pattern, value in registrations:
        index.add(pattern, value)
        live.append((pattern, value))
        check()
    # Remove a random subset, interleaved with lookups that exercise the cache.
    while live:
        pattern, value = live.pop(data.draw(st.integers(0, len(live) - 1)))
        assert index.remove(pattern, value)
        check()
    assert index._root.children == {}


def test_cached_result_cannot_be_corrupted() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a", "v")
    first = index.match("a")
    with pytest.raises(TypeError):
        first[0] = "x"  # type: ignore[index]
    assert index.match("a") == ("v",)
