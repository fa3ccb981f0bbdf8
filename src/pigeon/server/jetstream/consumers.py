"""Pull consumers: a JetStream consumer is an engine shared group read by one member.

A pull request (``CONSUMER.MSG.NEXT``) fetches from the group and sends each delivery to the
request's reply subject under the message's own subject, with an ack subject that carries
what nats-py reads from it (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
seq>.<timestamp ns>.<pending>``). Acks come back on that subject and settle the delivery.

Consumer sequences and the delivered/ack-floor pointers are kept in memory: after a restart
the consumer sequence starts again at 1 (stream sequences and the group's progress are durable).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
from typing import Any

from ...engine import Backoff, Engine, SharedGroup, SharedGroupConfig, StartAt
from ...engine.groups import Delivery
from ...errors import InvalidSubjectError, PigeonError
from ...subjects import matches, patterns_overlap, validate_pattern
from ..nats import NatsServer, Outgoing
from .errors import ApiError, bad_request, not_supported
from .meta import ConsumerMeta
from .streams import rfc3339

__all__ = [
    "PULL_CHUNK",
    "PullConsumer",
    "ack_policy_from_json",
    "check_consumer_name",
    "group_config_from_json",
    "header_block",
    "parse_pull_request",
]

log = logging.getLogger("pigeon.server.jetstream")

_NS = 1_000_000_000
_NO_MESSAGES = b"NATS/1.0 404 No Messages\r\n\r\n"
# How long one engine fetch of a pull request without expiry waits before looking again.
_POLL_S = 5.0
_MEMBER = "jetstream"
_UNLIMITED_ACK_PENDING = 2**31 - 1
_SCAN_BATCH = 1000


def _int(data: dict[str, Any], field: str, default: int) -> int:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{field} must be an integer, not {value!r}")
    return value


def _start_time(text: object) -> float:
    if not isinstance(text, str):
        raise bad_request("opt_start_time must be an RFC 3339 time")
    # RFC 3339 with up to nanoseconds: whole seconds parsed, the fraction added.
    main, _, rest = text.rstrip("Z").partition(".")
    try:
        seconds = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        raise bad_request(f"opt_start_time {text!r} is not an RFC 3339 UTC time") from None
    digits = "".join(c for c in rest if c.isdigit())
    return seconds + (int(digits) / 10 ** len(digits) if digits else 0.0)


def _start(engine: Engine, stream: str, config: dict[str, Any]) -> StartAt:
    policy = config.get("deliver_policy", "all")
    if policy == "all":
        return StartAt.earliest()
    if policy == "new":
        return StartAt.latest()
    if policy == "last":
        part = engine.stream_info(stream).partitions[0]
        return StartAt.offset(part.next_offset - 1) if part.messages else StartAt.latest()
    if policy == "by_start_sequence":
        return StartAt.offset(max(_int(config, "opt_start_seq", 1), 1) - 1)
    if policy == "by_start_time":
        return StartAt.time(_start_time(config.get("opt_start_time")))
    if policy == "last_per_subject" and not (config.get("filter_subject") or config.get("filter_subjects")):
        raise ApiError(
            400,
            10094,
            "consumer delivery policy is deliver last per subject, but optional filter subject is not set",
        )
    raise not_supported(f"deliver policy {policy!r}")


def _filters(engine: Engine, stream: str, config: dict[str, Any]) -> tuple[str, ...]:
    """The consumer's filter subjects, () for the whole stream (raises ApiError).

    As nats-server 2.15 does, a filter outside the stream's subjects is accepted (it simply
    matches nothing); the filters must not overlap one another.
    """
    single = config.get("filter_subject") or None
    many = config.get("filter_subjects") or []
    if single is not None and many:
        raise ApiError(400, 10136, "consumer cannot have both FilterSubject and FilterSubjects specified")
    filters = [single] if single is not None else many
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise bad_request("filter_subjects must be a list of subjects")
    for pattern in filters:
        try:
            validate_pattern(pattern)
        except InvalidSubjectError:
            raise ApiError(500, 10052, "invalid subject") from None
    for i, pattern in enumerate(filters):
        if any(patterns_overlap(pattern, other) for other in filters[i + 1 :]):
            raise ApiError(400, 10138, "consumer subject filters cannot overlap")
    subjects = engine.stream_info(stream).config.subjects
    if filters == [">"] or sorted(filters) == sorted(subjects):
        return ()  # the whole stream: nothing to skip
    return tuple(filters)


def _backoff(config: dict[str, Any], max_deliver: int) -> tuple[float, Backoff | None]:
    """(ack_wait_s, Backoff) for a ``backoff`` list of nanoseconds (raises ApiError).

    In nats-server the n-th delivery's ack wait is ``backoff[n-1]`` (the last repeating); the
    engine waits ``ack_wait_s`` and then ``delays_s[n-1]``, so ack_wait_s is the first step and
    each delay is its step minus the first (a step shorter than the first cannot be kept).
    """
    steps = config.get("backoff") or []
    if not isinstance(steps, list) or not all(type(s) is int and s > 0 for s in steps):
        raise bad_request("backoff must be a list of positive durations in nanoseconds")
    ack_wait = _int(config, "ack_wait", 0)  # nats-py sends 0 for "the default"
    if not steps:
        return (ack_wait if ack_wait > 0 else 30 * _NS) / _NS, None
    # nats-server's actual rule, whatever its message says: refused only below the length.
    if 0 < max_deliver < len(steps):
        raise ApiError(400, 10116, "max deliver is required to be > length of backoff values")
    first = steps[0] / _NS
    return first, Backoff(delays_s=tuple(max(0.0, s / _NS - first) for s in steps))


def group_config_from_json(
    engine: Engine, stream: str, name: str, config: dict[str, Any]
) -> tuple[SharedGroupConfig, tuple[str, ...]]:
    """A consumer configuration as a shared group configuration and filters (raises ApiError)."""
    if config.get("deliver_subject"):
        raise not_supported("push consumers (deliver_subject)")
    filters = _filters(engine, stream, config)
    max_deliver = _int(config, "max_deliver", -1)
    max_ack_pending = _int(config, "max_ack_pending", 1000)
    ack_wait_s, backoff = _backoff(config, max_deliver)
    try:
        group = SharedGroupConfig(
            name=name,
            start=_start(engine, stream, config),
            ack_wait_s=ack_wait_s,
            max_deliver=max_deliver if max_deliver > 0 else None,
            backoff=backoff,
            max_ack_pending=max_ack_pending if max_ack_pending > 0 else _UNLIMITED_ACK_PENDING,
            # JetStream has no dead letters: a message given up on is only counted as such.
            dead_letter=False,
        )
    except ValueError as error:
        raise bad_request(str(error)) from None
    return group, filters


def ack_policy_from_json(config: dict[str, Any]) -> str:
    """The consumer's ack policy (raises ApiError): "explicit", each message acked; "all", an ack
    covers every message delivered before it too; "none", a message counts as acked once sent."""
    policy = config.get("ack_policy") or "explicit"
    if policy not in ("explicit", "all", "none"):
        raise bad_request(f"ack_policy must be explicit, all or none, not {policy!r}")
    return str(policy)


def _policy_json(start: StartAt) -> dict[str, Any]:
    if start.kind == "earliest":
        return {"deliver_policy": "all"}
    if start.kind == "latest":
        return {"deliver_policy": "new"}
    if start.kind == "offset":
        return {"deliver_policy": "by_start_sequence", "opt_start_seq": int(start.value) + 1}
    return {"deliver_policy": "by_start_time", "opt_start_time": rfc3339(round(start.value * _NS))}


def parse_pull_request(payload: bytes) -> tuple[int, float | None, bool]:
    """(batch, expires in seconds or None, no_wait) of a MSG.NEXT request (raises ApiError)."""
    text = payload.strip()
    if not text:
        return 1, None, False
    if text.isdigit():
        return max(int(text), 1), None, False
    try:
        data = json.loads(text)
    except ValueError:
        raise bad_request("invalid pull request") from None
    if not isinstance(data, dict):
        raise bad_request("invalid pull request")
    batch = max(_int(data, "batch", 1), 1)
    expires = _int(data, "expires", 0)
    if data.get("max_bytes") or data.get("idle_heartbeat"):
        raise not_supported("max_bytes and idle_heartbeat in pull requests")
    return batch, expires / _NS if expires > 0 else None, bool(data.get("no_wait"))


def header_block(headers: dict[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


# A big pull is served in chunks of this many messages, written as they are ready.
PULL_CHUNK = 100


class PullConsumer:
    """One consumer of one stream: the shared group, its member and the deliveries not settled."""

    def __init__(self, server: NatsServer, engine: Engine, group: SharedGroup, meta: ConsumerMeta) -> None:
        self.server = server
        self.engine = engine
        self.group = group
        self.stream = group.stream.name
        self.name = group.name
        self.meta = meta
        # Offsets below this were fetched (delivered, or skipped by the filters) at least once.
        self.fetched_to = 0
        self.last_active = time.monotonic()
        self.member = group.member(_MEMBER)
        self.outstanding: dict[int, Delivery] = {}  # offset -> its current delivery
        self.consumer_seq = 0
        self.delivered_stream_seq = 0
        self.ack_floor_consumer_seq = 0
        self.purged_to = 0  # the stream's last sequence at its latest purge
        self.waiting = 0
        self.tasks: set[asyncio.Task[None]] = set()

    # -- pull requests ---------------------------------------------------------------------

    async def pull(self, reply: str, batch: int, expires: float | None, no_wait: bool) -> None:
        """Serve one pull request: up to ``batch`` messages, then 404 or 408 when short of it.

        With ``expires`` and ``no_wait`` nats-server waits for the first message only: it sends
        what is there then (up to the batch) and ends with 404 (nats-py's fetch asks so, and
        returns at once). With ``expires`` alone it waits for the whole batch until it expires;
        with neither, until it has its batch.
        """
        deadline = None if expires is None else time.monotonic() + expires
        waits = expires is not None or not no_wait
        left = batch
        self.waiting += 1
        self.last_active = time.monotonic()
        try:
            while left > 0:
                if not waits:
                    timeout = 0.0
                elif deadline is None:
                    timeout = _POLL_S
                else:
                    timeout = max(0.0, deadline - time.monotonic())
                asked = min(left, PULL_CHUNK)
                deliveries = await self.member.fetch(asked, timeout)
                wanted = await self._skip_filtered(deliveries)
                await self._hand_over(reply, wanted)
                left -= len(wanted)
                if wanted and no_wait:
                    waits = False  # the first messages came: the rest only if they are there now
                if left and not waits and len(deliveries) < asked:  # nothing more there now
                    # In the same write as the messages: the client's fetch returns on it.
                    self.server.publish(reply, headers=_NO_MESSAGES)
                    return
                if left and wanted:
                    # Let this chunk go out before making the next: the client parses it
                    # while the server prepares the rest.
                    await asyncio.sleep(0)
                if left and deadline is not None and time.monotonic() >= deadline:
                    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: %d\r\n" % left
                    self.server.publish(reply, headers=status + b"Nats-Pending-Bytes: 0\r\n\r\n")
                    return
        finally:
            self.waiting -= 1
            self.last_active = time.monotonic()

    def has_room(self, count: int) -> bool:
        """Whether ``count`` more deliveries fit under max_ack_pending now."""
        return self.group.ack_pending + count <= self.group.config.max_ack_pending

    async def pull_head(self, reply: str, count: int) -> int:
        """Send up to ``count`` messages now, without waiting for any: the first chunk of a pull
        request served ahead of the acks that came with it. Returns how many were sent."""
        self.last_active = time.monotonic()
        deliveries = await self.member.fetch(count, 0.0)
        wanted = await self._skip_filtered(deliveries)
        await self._hand_over(reply, wanted)
        return len(wanted)

    def idle_s(self) -> float:
        """Seconds without a pull request waiting or arriving (what ``inactive_threshold`` measures)."""
        return 0.0 if self.waiting else time.monotonic() - self.last_active

    def _wanted(self, subject: str) -> bool:
        return not self.meta.filters or any(matches(f, subject) for f in self.meta.filters)

    async def _skip_filtered(self, deliveries: list[Delivery]) -> list[Delivery]:
        """The deliveries the filters let through; the others are acked unseen."""
        if deliveries:
            self.fetched_to = max(self.fetched_to, deliveries[-1].offset + 1)
        wanted = [d for d in deliveries if self._wanted(d.message.subject)]
        if len(wanted) < len(deliveries):
            await self.member.ack_batch([d for d in deliveries if not self._wanted(d.message.subject)])
        return wanted

    async def _hand_over(self, reply: str, deliveries: list[Delivery]) -> None:
        self._send(reply, deliveries)
        if self.meta.ack_policy == "none" and deliveries:
            # No ack will come: what is sent is done, as with nats-server's AckNone.
            first = self.consumer_seq - len(deliveries) + 1
            await self.ack_many([(d.offset + 1, first + i) for i, d in enumerate(deliveries)])

    def _send(self, reply: str, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        pending = self.num_pending() + len(deliveries)
        prefix = f"$JS.ACK.{self.stream}.{self.name}."
        outstanding = self.outstanding
        out: list[Outgoing] = []
        timestamp, timestamp_ns = None, 0
        for delivery in deliveries:
            message = delivery.message
            self.consumer_seq += 1
            pending -= 1
            stream_seq = delivery.offset + 1
            if stream_seq > self.delivered_stream_seq:
                self.delivered_stream_seq = stream_seq
            outstanding[delivery.offset] = delivery
            if message.timestamp != timestamp:  # messages stored together share it
                timestamp = message.timestamp
                timestamp_ns = round(timestamp * 1_000_000) * 1000
            ack = (
                f"{prefix}{delivery.delivery_count}.{stream_seq}.{self.consumer_seq}.{timestamp_ns}.{pending}"
            )
            headers = message.headers
            out.append((message.subject, message.payload, ack, header_block(headers) if headers else None))
        self.server.publish_many(reply, out)

    # -- acks ------------------------------------------------------------------------------

    async def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """Plain acks of several deliveries, as (stream seq, consumer seq): one state-log write.
        With ack policy "all", the highest covers every delivery before it as well."""
        if self.meta.ack_policy == "all" and acks:
            last = max(acks)
            last_offset = last[0] - 1
            acks = [(o + 1, 0) for o in self.outstanding if o < last_offset] + [last]
            # and those not out on lease: nacked, expired, or delivered before a restart
            await self.member.ack_waiting(last_offset + 1)
        held: dict[int, tuple[Delivery, int]] = {}
        for stream_seq, consumer_seq in acks:
            delivery = self.outstanding.get(stream_seq - 1)
            if delivery is not None:
                held[stream_seq - 1] = (delivery, consumer_seq)
        if not held:
            return
        try:
            await self.member.ack_batch([delivery for delivery, _ in held.values()])
        except PigeonError:
            # One of them went back to the group meanwhile: settle each on its own.
            for offset, (_, consumer_seq) in held.items():
                await self.settle(offset + 1, consumer_seq, b"+ACK")
            return
        for offset, (delivery, _) in held.items():
            if self.outstanding.get(offset) is delivery:
                del self.outstanding[offset]
        committed = self.group.lag()[0].committed
        below = [consumer_seq for offset, (_, consumer_seq) in held.items() if offset < committed]
        if below:
            self.ack_floor_consumer_seq = max(self.ack_floor_consumer_seq, *below)

    async def settle(self, stream_seq: int, consumer_seq: int, payload: bytes) -> None:
        """Apply an ack (+ACK or empty, -NAK [{"delay": ns}], +TERM, +WPI) to a delivery."""
        offset = stream_seq - 1
        verb, _, rest = payload.strip().partition(b" ")
        if self.meta.ack_policy == "all" and verb in (b"", b"+ACK", b"+NXT"):
            await self.ack_many([(stream_seq, consumer_seq)])
            return
        delivery = self.outstanding.get(offset)
        if delivery is None:
            return  # settled already, or delivered before a restart: nothing holds it
        try:
            if verb == b"+WPI":
                await delivery.in_progress()
                return
            if verb == b"-NAK":
                await delivery.nack(_nak_delay(rest))
            elif verb == b"+TERM":
                await delivery.term(rest.decode(errors="replace") or None)
            elif verb in (b"", b"+ACK", b"+NXT"):
                await delivery.ack()
            else:
                return
        except PigeonError as error:
            # Its lease expired and it went back to the group: the redelivery is what counts.
            log.debug("ack of %s seq %d on %s ignored: %s", self.name, stream_seq, self.stream, error)
        if self.outstanding.get(offset) is delivery:
            del self.outstanding[offset]
        if verb != b"-NAK" and offset < self.group.lag()[0].committed:
            self.ack_floor_consumer_seq = max(self.ack_floor_consumer_seq, consumer_seq)

    async def purged(self, last_seq: int) -> None:
        """The stream was purged up to ``last_seq``: as nats-server's consumers do, count it all
        delivered and acknowledged, and let go of the deliveries still held."""
        gone = [(offset + 1, 0) for offset in self.outstanding if offset < last_seq]
        if gone:
            await self.ack_many(gone)
        self.delivered_stream_seq = max(self.delivered_stream_seq, last_seq)
        self.purged_to = max(self.purged_to, last_seq)

    # -- observing -------------------------------------------------------------------------

    def num_pending(self) -> int:
        """Messages not delivered yet; with filters, only those they let through (counted by a scan)."""
        lag = self.group.lag()[0]
        if not self.meta.filters:
            # The group counts messages that retention or a purge removed before it read
            # them until it reads past them; they will never be delivered.
            first = self.group.stream.partitions[0].first_offset
            return max(0, lag.pending - max(0, first - max(lag.committed, self.fetched_to)))
        # Past both the group's floor and what was fetched, nothing was delivered or skipped.
        offset, count = max(lag.committed, self.fetched_to), 0
        while offset < lag.head:
            messages = self.engine.fetch(self.stream, 0, offset, _SCAN_BATCH)
            if not messages:
                break
            count += sum(1 for m in messages if self._wanted(m.subject))
            last = messages[-1].offset
            assert last is not None  # a stored message knows its offset
            offset = last + 1
        return count

    def info(self) -> dict[str, Any]:
        lag = self.group.lag()[0]
        return {
            "stream_name": self.stream,
            "name": self.name,
            "created": rfc3339(self.meta.created_ns),
            "config": self.config_json(),
            "delivered": {"consumer_seq": self.consumer_seq, "stream_seq": self.delivered_stream_seq},
            "ack_floor": {
                "consumer_seq": self.ack_floor_consumer_seq,
                "stream_seq": max(lag.committed, self.purged_to),
            },
            "num_ack_pending": self.group.ack_pending,
            "num_redelivered": sum(1 for d in self.outstanding.values() if d.delivery_count > 1),
            "num_waiting": self.waiting,
            "num_pending": self.num_pending(),
        }

    def config_json(self) -> dict[str, Any]:
        config, meta = self.group.config, self.meta
        out: dict[str, Any] = {} if meta.ephemeral else {"durable_name": self.name}
        out |= {
            "name": self.name,
            **_policy_json(config.start),
            "ack_policy": meta.ack_policy,
            "ack_wait": round(config.ack_wait_s * _NS),
            "max_deliver": config.max_deliver or -1,
            "replay_policy": "instant",
            "max_waiting": 512,
            "max_ack_pending": config.max_ack_pending,
            "num_replicas": 0,
        }
        if len(meta.filters) == 1:
            out["filter_subject"] = meta.filters[0]
        elif meta.filters:
            out["filter_subjects"] = list(meta.filters)
        if config.backoff is not None:
            out["backoff"] = [round((config.ack_wait_s + d) * _NS) for d in config.backoff.delays_s]
        if meta.inactive_threshold_s is not None:
            out["inactive_threshold"] = round(meta.inactive_threshold_s * _NS)
        return out

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


def _nak_delay(rest: bytes) -> float | None:
    if not rest:
        return None
    try:
        data = json.loads(rest)
    except ValueError:
        return None
    delay = data.get("delay") if isinstance(data, dict) else None
    return delay / _NS if isinstance(delay, int) and not isinstance(delay, bool) and delay > 0 else None


def check_consumer_name(name: str) -> None:
    if not name or any(c in name for c in ".*> \t"):
        raise ApiError(400, 10103, "durable name can not contain '.', '*', '>'")
