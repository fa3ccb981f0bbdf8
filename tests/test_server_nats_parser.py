"""The NATS protocol parser on its own: valid frames split anywhere, garbage, limits."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.server.nats.protocol import (
    Connect,
    Op,
    Parser,
    Ping,
    Pong,
    ProtocolError,
    Pub,
    Sub,
    Unsub,
    parse_headers,
)

MAX_PAYLOAD = 4096

tokens = st.text(alphabet="abcxyz019_-", min_size=1, max_size=6).map(str.encode)
subjects = st.lists(tokens, min_size=1, max_size=4).map(b".".join)
sids = st.integers(1, 10**6).map(lambda n: b"%d" % n)
payloads = st.binary(max_size=300)
header_blocks = st.lists(st.tuples(tokens, tokens), max_size=3).map(
    lambda pairs: b"NATS/1.0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in pairs) + b"\r\n"
)
separators = st.sampled_from([b" ", b"\t", b"  "])
line_ends = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, Op]:
    """One wire frame and the operation it must parse to."""
    kind = draw(st.sampled_from(["pub", "hpub", "sub", "unsub", "ping", "pong", "connect"]))
    sep, end = draw(separators), draw(line_ends)
    verb_case = draw(st.sampled_from([bytes.upper, bytes.lower]))
    if kind in ("pub", "hpub"):
        subject, payload = draw(subjects), draw(payloads)
        reply = draw(st.one_of(st.just(b""), subjects))
        words = [subject] + ([reply] if reply else [])
        if kind == "hpub":
            headers = draw(header_blocks)
            data = headers + payload
            words += [b"%d" % len(headers), b"%d" % len(data)]
            op: Op = Pub(subject, reply, len(headers), data)
        else:
            data = payload
            words.append(b"%d" % len(data))
            op = Pub(subject, reply, 0, data)
        return verb_case(kind.encode()) + sep + sep.join(words) + end + data + b"\r\n", op
    if kind == "sub":
        subject, sid = draw(subjects), draw(sids)
        queue = draw(st.one_of(st.just(b""), tokens))
        words = [subject] + ([queue] if queue else []) + [sid]
        return verb_case(b"sub") + sep + sep.join(words) + end, Sub(subject, queue, sid)
    if kind == "unsub":
        sid, limit = draw(sids), draw(st.one_of(st.none(), st.integers(0, 10**6)))
        words = [sid] + ([b"%d" % limit] if limit is not None else [])
        return verb_case(b"unsub") + sep + sep.join(words) + end, Unsub(sid, limit)
    if kind == "connect":
        verbose = draw(st.booleans())
        body = b'{"verbose":%s,"name":"n"}' % (b"true" if verbose else b"false")
        return b"CONNECT " + body + end, Connect({"verbose": verbose, "name": "n"})
    return verb_case(kind.encode()) + end, Ping() if kind == "ping" else Pong()


def feed_all(parser: Parser, chunks: list[bytes]) -> list[Op]:
    ops: list[Op] = []
    for chunk in chunks:
        ops += parser.feed(chunk)
    return ops


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=8), st.data())
def test_frames_split_anywhere_parse_like_whole(
    frame_list: list[tuple[bytes, Op]], data: st.DataObject
) -> None:
    stream = b"".join(frame for frame, _ in frame_list)
    expected = [op for _, op in frame_list]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    whole = Parser(MAX_PAYLOAD)
    assert whole.feed(stream) == expected
    split = Parser(MAX_PAYLOAD)
    assert feed_all(split, chunks) == expected
    assert split.buffered == 0


def test_every_single_byte_split_of_a_sequence() -> None:
    stream = (
        b"CONNECT {}\r\nSUB a.* q 1\r\nPUB a.b r 3\r\nabc\r\n"
        b"HPUB a.c 12 14\r\nNATS/1.0\r\n\r\nhi\r\nUNSUB 1 5\r\nPING\r\nPONG\n"
    )
    expected = Parser(MAX_PAYLOAD).feed(stream)
    assert len(expected) == 7
    for cut in range(len(stream) + 1):
        assert feed_all(Parser(MAX_PAYLOAD), [stream[:cut], stream[cut:]]) == expected, cut
    assert feed_all(Parser(MAX_PAYLOAD), [stream[i : i + 1] for i in range(len(stream))]) == expected


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_garbage_only_raises_protocol_error(chunks: list[bytes]) -> None:
    parser = Parser(MAX_PAYLOAD, max_control_line=512)
    try:
        feed_all(parser, chunks)
    except ProtocolError as error:
        assert error.text in {
            "Unknown Protocol Operation", "Parser Error", "Maximum Payload Violation",
            "Maximum Control Line Exceeded",
        }  # fmt: skip
    # Held-back bytes are bounded by a control line or one announced payload.
    assert parser.buffered <= MAX_PAYLOAD + 512 + 2


@settings(max_examples=200, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=4), st.binary(min_size=1, max_size=50))
def test_ops_before_a_fault_are_kept(frame_list: list[tuple[bytes, Op]], tail: bytes) -> None:
    stream = b"".join(frame for frame, _ in frame_list)
    try:
        ops = Parser(MAX_PAYLOAD).feed(stream + b"BOGUS\r\n" + tail)
    except ProtocolError as error:
        ops = error.ops
    else:
        pytest.fail("BOGUS parsed")
    assert ops == [op for _, op in frame_list]


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"PUB a 5000\r\n", "Maximum Payload Violation"),
        (b"HPUB a 12 5000\r\n", "Maximum Payload Violation"),
        (b"PUB a 3\r\nabcd\r\n", "Unknown Protocol Operation"),
        (b"PUB a 3\r\nabc\nX", "Unknown Protocol Operation"),
        (b"HPUB a 14 12\r\n", "Parser Error"),
        (b"HPUB a 2 2\r\n", "Parser Error"),
        (b"HPUB a 12 12\r\nHTTP/1.1\r\n\r\n\r\n", "Parser Error"),
        (b"PUB a +3\r\n", "Parser Error"),
        (b"PUB a \xd9\xa3\r\n", "Parser Error"),  # an Arabic-Indic digit three
        (b"UNSUB\r\n", "Unknown Protocol Operation"),
        (b"PINGX\r\n", "Unknown Protocol Operation"),
        (b"CONNECT [1]\r\n", "Parser Error"),
        (b"x" * 5000, "Maximum Control Line Exceeded"),
    ],
)
def test_specific_faults(data: bytes, text: str) -> None:
    parser = Parser(MAX_PAYLOAD)
    with pytest.raises(ProtocolError) as caught:
        parser.feed(data)
    assert caught.value.text == text
    with pytest.raises(ProtocolError):
        parser.feed(b"PING\r\n")  # a failed parser stays failed


@pytest.mark.parametrize(
    ("line", "op"),
    [
        (b"PUB a.b  3\r\n", Pub(b"a.b", b"", 0, b"xyz")),  # nats-py's form, with an empty reply
        (b"PUB a.b r.1 3\r\n", Pub(b"a.b", b"r.1", 0, b"xyz")),
        (b"PUB   a.b   r.1   3\r\n", Pub(b"a.b", b"r.1", 0, b"xyz")),
        (b"PUB a.b\t3\r\n", Pub(b"a.b", b"", 0, b"xyz")),  # the general path's forms
        (b"pub a.b 3\n", Pub(b"a.b", b"", 0, b"xyz")),
    ],
)
def test_pub_lines_parse_alike_in_every_form(line: bytes, op: Pub) -> None:
    assert Parser(MAX_PAYLOAD).feed(line + b"xyz\r\nPING\r\n") == [op, Ping()]


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"PUB a 12345678901\r\n", "Parser Error"),
        (b"PUB a b c 1\r\nx\r\n", "Parser Error"),
        (b"PUB " + b"a" * 40 + b" 1\r\nx\r\n", "Maximum Control Line Exceeded"),
        (b"PUB a 3\r\nabc\r\nPUB b 5000\r\n", "Maximum Payload Violation"),
    ],
)
def test_pub_line_faults(data: bytes, text: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        Parser(MAX_PAYLOAD, max_control_line=32).feed(data)
    assert caught.value.text == text


def test_large_payload_in_small_chunks_is_fast() -> None:
    size = 1024 * 1024
    stream = b"PUB big %d\r\n" % size + b"x" * size + b"\r\n"
    parser = Parser(size)
    started = time.perf_counter()
    ops = feed_all(parser, [stream[i : i + 1024] for i in range(0, len(stream), 1024)])
    assert time.perf_counter() - started < 1.0  # linear: chunks are joined once, not re-copied
    assert ops == [Pub(b"big", b"", 0, b"x" * size)]


def test_many_small_messages_in_bulk() -> None:
    stream = b"PUB s 5\r\nhello\r\n" * 100_000
    started = time.perf_counter()
    ops = feed_all(Parser(MAX_PAYLOAD), [stream[i : i + 65536] for i in range(0, len(stream), 65536)])
    assert len(ops) == 100_000
    assert time.perf_counter() - started < 2.0


def test_parse_headers() -> None:
    assert parse_headers(b"NATS/1.0 503\r\n\r\n") == (503, "", [])
    assert parse_headers(b"NATS/1.0 408 Request Timeout\r\nA: 1\r\nA: 2\r\nB:x\r\n\r\n") == (
        408, "Request Timeout", [("A", "1"), ("A", "2"), ("B", "x")]
    )  # fmt: skip
    assert parse_headers(b"NATS/1.0\r\nNats-Msg-Id: m1\r\n\r\n") == (None, "", [("Nats-Msg-Id", "m1")])
