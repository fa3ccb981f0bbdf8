"""Subject syntax and matching, NATS style.

A subject is a dot-separated list of tokens, ``orders.eu.created``. A subscription (or a
stream's capture list) uses a *pattern*: ``*`` stands for exactly one token and ``>`` for
one or more trailing tokens, so ``orders.*.created`` and ``orders.>`` both match the subject
above. Wildcards are whole tokens only; a published subject never contains one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Generic, NoReturn, TypeVar

from .errors import InvalidSubjectError

__all__ = [
    "MAX_SUBJECT_BYTES",
    "SubjectIndex",
    "matches",
    "patterns_overlap",
    "validate_pattern",
    "validate_subject",
]

MAX_SUBJECT_BYTES = 1024

T = TypeVar("T")

# Whitespace (Unicode-wide, via \s), C0/C1 control characters and lone surrogates; the
# surrogates are listed because they cannot be encoded to UTF-8 for storage or the wire.
_BAD_CHAR = r"\s\x00-\x1f\x7f-\x9f\ud800-\udfff"
_BAD_CHAR_RE = re.compile(f"[{_BAD_CHAR}]")
_LITERAL_TOKEN = f"[^{_BAD_CHAR}.*>]+"
# Whole-string shapes of valid input: a single C-level regex call accepts the common case,
# and only rejected input pays for the slower diagnosis that names the problem.
_SUBJECT_RE = re.compile(f"{_LITERAL_TOKEN}(?:\\.{_LITERAL_TOKEN})*")
_PATTERN_RE = re.compile(f"(?:(?:{_LITERAL_TOKEN}|\\*)\\.)*(?:{_LITERAL_TOKEN}|\\*|>)")

_STAR = "*"
_GT = ">"


def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a valid literal subject (no wildcards), else raise."""
    if isinstance(subject, str) and _SUBJECT_RE.fullmatch(subject):
        _check_length(subject, "subject")
        return subject
    _diagnose(subject, "subject", wildcards=False)


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise."""
    if isinstance(pattern, str) and _PATTERN_RE.fullmatch(pattern):
        _check_length(pattern, "subject pattern")
        return pattern
    _diagnose(pattern, "subject pattern", wildcards=True)


def matches(pattern: str, subject: str) -> bool:
    """Whether the literal ``subject`` matches ``pattern``; both are validated first."""
    validate_pattern(pattern)
    validate_subject(subject)
    return _match_tokens(pattern.split("."), subject.split("."))


def patterns_overlap(a: str, b: str) -> bool:
    """Whether at least one literal subject matches both patterns."""
    validate_pattern(a)
    validate_pattern(b)
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb, strict=False):
        # '>' still needs one token here, which the other side supplies, and then absorbs
        # whatever the other side requires after it.
        if x == _GT or y == _GT:
            return True
        if x != y and x != _STAR and y != _STAR:
            return False
    # No '>' seen: each pattern matches subjects of exactly its own length.
    return len(ta) == len(tb)


class SubjectIndex(Generic[T]):
    """Patterns mapped to values (e.g. subscriptions), answering "who wants this subject?".

    A pattern may carry many values, and the same value may be registered more than once;
    :meth:`match` returns each registration once. Lookups walk a token trie, so their cost
    grows with the subject's length and the wildcard fan-out rather than with the number of
    patterns, and recent answers are cached until the next :meth:`add` or :meth:`remove`.

    Not thread-safe: use it from one thread (one asyncio loop). No method awaits, so no
    coroutine can observe it half-updated.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, not {cache_size}")
        self._root: _Node[T] = _Node()
        self._count = 0
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[T, ...]] = OrderedDict()

    def __len__(self) -> int:
        """The number of registrations (pattern, value pairs, counting repeats)."""
        return self._count

    def add(self, pattern: str, value: T) -> None:
        """Register ``value`` under ``pattern``."""
        node = self._root
        for token in validate_pattern(pattern).split("."):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        node.values.append(value)
        self._count += 1
        self._cache.clear()

    def remove(self, pattern: str, value: T) -> bool:
        """Drop one registration of ``value`` (compared with ``==``) under ``pattern``.

        Returns False, changing nothing, when there is no such registration.
        """
        path = [self._root]
        tokens = validate_pattern(pattern).split(".")
        for token in tokens:
            child = path[-1].children.get(token)
            if child is None:
                return False
            path.append(child)
        try:
            path[-1].values.remove(value)
        except ValueError:
            return False
        self._count -= 1
        self._cache.clear()
        # Prune nodes left empty so that churn in subscriptions does not grow the trie.
        for depth in range(len(tokens), 0, -1):
            node = path[depth]
            if node.values or node.children:
                break
            del path[depth - 1].children[tokens[depth - 1]]
        return True

    def match(self, subject: str) -> tuple[T, ...]:
        """Every value whose pattern matches the literal ``subject``, once per registration.

        The order is unspecified. A tuple is returned because cached answers are shared
        between calls and must not be changed by a caller.
        """
        cache = self._cache
        try:
            hit = cache.get(subject)
        except TypeError:  # unhashable, so certainly not a str: let validation say so
            hit = None
        if hit is not None:
            cache.move_to_end(subject)
            return hit
        # Only validated subjects reach the cache, so a hit above needs no validation.
        result = tuple(self._walk(validate_subject(subject).split(".")))
        if self._cache_size:
            cache[subject] = result
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return result

    def _walk(self, tokens: list[str]) -> list[T]:
        found: list[T] = []
        level = [self._root]
        for token in tokens:
            following: list[_Node[T]] = []
            for node in level:
                children = node.children
                if not children:
                    continue
                # '>' is always a pattern's last token, so its node only holds values, and
                # it matches here because at least this token remains.
                rest = children.get(_GT)
                if rest is not None:
                    found.extend(rest.values)
                child = children.get(token)
                if child is not None:
                    following.append(child)
                child = children.get(_STAR)
                if child is not None:
                    following.append(child)
            if not following:
                return found
            level = following
        for node in level:
            found.extend(node.values)
        return found


class _Node(Generic[T]):
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.values: list[T] = []


def _match_tokens(pattern: list[str], subject: list[str]) -> bool:
    for i, token in enumerate(pattern):
        if token == _GT:
            return len(subject) > i
        if i >= len(subject) or (token != _STAR and token != subject[i]):
            return False
    return len(pattern) == len(subject)


def _show(text: str) -> str:
    # Keep error messages one readable line even for a pathological 100 kB "subject".
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def _check_length(text: str, what: str) -> None:
    # A character is at most 4 UTF-8 bytes, so short strings skip the encode.
    if len(text) * 4 > MAX_SUBJECT_BYTES:
        size = len(text.encode())
        if size > MAX_SUBJECT_BYTES:
            raise InvalidSubjectError(
                f"invalid {what} {_show(text)}: {size} bytes, over the "
                f"{MAX_SUBJECT_BYTES}-byte limit"
            )


def _diagnose(text: object, what: str, *, wildcards: bool) -> NoReturn:
    """Raise the error that says why ``text`` was rejected."""
    if not isinstance(text, str):
        raise InvalidSubjectError(
            f"invalid {what} {text!r}: must be a str, not {type(text).__name__}"
        )
    if not text:
        raise InvalidSubjectError(f"invalid {what} '': empty")
    bad = _BAD_CHAR_RE.search(text)
    if bad is not None:
        raise InvalidSubjectError(
            f"invalid {what} {_show(text)}: whitespace or control character "
            f"{bad.group()!r} at index {bad.start()}"
        )
    _check_length(text, what)
    tokens = text.split(".")
    for position, token in enumerate(tokens, start=1):
        if not token:
            raise InvalidSubjectError(
                f"invalid {what} {_show(text)}: empty token at position {position} "
                "(leading, trailing or double '.')"
            )
        if "*" not in token and ">" not in token:
            continue
        if not wildcards:
            raise InvalidSubjectError(
                f"invalid {what} {_show(text)}: wildcard in token {token!r} at position "
                f"{position}; a published subject must be literal"
            )
        if token not in (_STAR, _GT):
            raise InvalidSubjectError(
                f"invalid {what} {_show(text)}: token {token!r} at position {position} "
                "mixes a wildcard with other characters; '*' and '>' must be whole tokens"
            )
        if token == _GT and position != len(tokens):
            raise InvalidSubjectError(
                f"invalid {what} {_show(text)}: '>' at position {position} must be the last token"
            )
    raise AssertionError(f"{what} {text!r} rejected without a diagnosis")  # pragma: no cover
