"""The PostgreSQL transport (``postgresql://`` or ``postgres://``): pigeon on tables, row locks
and LISTEN/NOTIFY, with asyncpg.

Settings: `PostgresOptions`. Needs the ``postgres`` extra (asyncpg) and PostgreSQL 12 or
later. Every table lives in one schema (``PostgresOptions.schema``, ``pigeon``), created on
open when missing, so several deployments can share a database. PostgreSQL provides
durability, transactions, row locks and NOTIFY; everything else in the capability list is
built by pigeon on them (``emulated``), as described here.

Mapping of pigeon's concepts to tables (`._schema`)
----------------------------------------------------
- A stream is a row of ``streams`` (subjects, partitions, limits, and a generation number
  that changes when a stream of the same name is created again). Every transport caches the
  registry and reloads it when the control channel says it changed; ``meta.version`` counts
  changes, so a publish routed with a stale cache is caught in its own transaction and
  retried (a stream created a moment ago by another process is never missed).
- A partition is a counter row of ``partitions`` (``next_offset``); a message is a row of
  ``messages`` keyed by (stream, partition, offset), with subject, key, payload, headers
  (jsonb), id and ``created_at``. Keyed messages go to ``partition_for_key``, as in every
  transport; the unkeyed messages of one publish call go to one partition, the next call's
  to the next.
- Offsets are 0-based and dense per partition, and they commit in order. A write updates
  the counter row (``UPDATE ... SET next_offset = next_offset + n RETURNING``) and inserts its
  rows in the same transaction, holding the counter's row lock until it commits: writers to
  one partition serialize and commit in offset order. A reader that remembers "the next
  offset to read" therefore never skips a message whose transaction committed late (the
  classic hazard of sequence-assigned ids read with ``id > last``); a rolled-back write
  rolls its counter back too, so no gap is left. The price: one partition takes one write
  transaction at a time, so concurrent publishers scale with partitions, and a transaction
  held open (`PostgresTransport.publish_in`) holds up the other writers of its partition.
- ``publish_in(connection, ...)`` publishes inside the caller's own transaction: the message
  is stored, and announced, only if that transaction commits (a transactional outbox).
- Dedup: ``dedup`` holds (stream, msg_id) -> position. A publish with an id claims it with
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE created_at < now() - window`` before taking
  the counter lock: a row within the window makes it a duplicate (the original position,
  ``duplicate=True``, no core delivery); a concurrent publisher of the same id waits for the
  first to commit. Rows older than the window are pruned by maintenance.
- Timestamps are the server's ``clock_timestamp()`` taken under the counter lock, so they
  grow with the offset within a partition; ``StartAt.time`` is a binary search over offsets.
- Retention runs every ``maintenance_interval_s`` (in one process at a time, under an
  advisory lock) and in `stream_state`, deleting the oldest rows of each partition.
  Approximations: each limit is split evenly over the partitions (``ceil(limit /
  partitions)`` each) rather than applied to their total; ``max_bytes`` counts payload bytes
  only (not subjects, headers or row overhead); limits can be exceeded between two passes.
- Deleting a stream deletes its rows, its groups and their dead-letter streams.
- `list_streams` reads the ``streams`` table (dead-letter streams included). `purge_stream`
  deletes, in one transaction, every message below each partition's counter, as retention
  does: publishes committed before it are gone, later ones stay, offsets continue. Groups
  skip the gap. A shared group's rows of purged messages are deleted unless a member holds
  them: its ack works, and a nack, an expired lease or its leaving finds the message gone
  and drops the row. Dead letters live in their own streams and stay.

Shared groups (`._shared`)
--------------------------
A cursor per partition (the next offset not yet handed to the group) and a row in
``deliveries`` per message handed out and not finished: state (``leased`` or ``ready``),
delivery_count, lease token, member, ``leased_until``, ``not_before`` and the failures so
far. A fetch claims due rows (``ready`` past ``not_before``, or ``leased`` past
``leased_until``: the ack timeout) with ``FOR UPDATE SKIP LOCKED``, then takes new messages
from the cursors under the group's advisory lock, up to ``max_ack_pending`` rows. An ack
deletes the row (checking the lease token: a member whose lease was taken gets
`DeliveryNotOwnedError`); concurrent acks share one DELETE. ``nack(delay)`` sets
``not_before`` (the backoff when no delay is given); ``in_progress`` pushes ``leased_until``
back. ``term``, and a failure on the last allowed delivery, write the dead letter and delete
the row in one transaction; a row whose last allowed lease expired is dead-lettered by the
next fetch. ``key_ordered``: a message whose key has an unfinished earlier message is parked
(``ready``, 0 deliveries) until it is the oldest of its key. Closing a member makes its
leased rows ready at once.

Ordered groups (`._ordered`)
----------------------------
``members`` holds live members (join order, heartbeat expiry); ``group_partitions`` holds per
partition the committed offset, the owner and its heartbeat expiry, a pause, and durable
delivery counts. Member i of the n live members, in join order, owns the partitions with
p % n == i (members beyond the partition count idle); it takes a partition when free or when
its owner's heartbeat expired, and hands one over once its outstanding batch is settled.
Reads are ``offset >= committed`` in order, one outstanding batch per partition; each ack
commits the settled prefix (only while still the owner, never before the ack); a nack
rewinds to the first unsettled message and pauses the partition for the delay.

Dead letters: a stream ``<stream>-<group>-dlq`` capturing ``$DLQ.<stream>.<group>`` (created
with the group), written with `dead_letter_message`, in the same transaction that takes the
message out of the group. Lag: ``head`` (the counter) minus ``committed`` (ordered: the
committed offset; shared: the lowest unfinished offset), with pending (never delivered or
parked), in flight (leased) and waiting (to be delivered again) for shared groups.

Core messaging (`._core`)
-------------------------
A core message is a NOTIFY on ``<schema>:core`` carrying a JSON frame; every transport
LISTENs on one dedicated connection and matches subjects locally (wildcards). Publishers
only send it when some subscription matches: subscriptions are registered in
``core_interest`` and announced on ``<schema>:ctl``, so every transport knows all of them (a
subscription made in another process is known once its announcement arrives, within
milliseconds; rows of processes whose connection is gone are pruned). A publish stored in a
stream sends its NOTIFY in the same transaction, so core subscribers see it only if it was
stored (and never for a duplicate).

- NOTIFY payloads must stay under 8000 bytes: a larger frame is stored in ``core_blobs`` in
  the publishing transaction and the NOTIFY carries its id; subscribers read it (in arrival
  order) and maintenance deletes it after ``core_blob_ttl_s``.
- Queue groups are emulated: the publisher picks one member of each matching queue group, in
  turn, and names it in the frame; only that member takes it.
- Request-reply: each request gets an inbox subject (``_INBOX.<transport>.<n>``), carried in
  the frame and exposed as ``Headers.REPLY_TO``; replies to inboxes are always sent. NOTIFY
  cannot tell whether anyone received a message, so ``no_responders`` is False: a request
  nobody answers raises `RequestTimeoutError` after its timeout.
- Consumers waiting in ``fetch`` are woken by a NOTIFY on ``<schema>:data`` (new messages,
  nacks, members joining or leaving), and otherwise look again every ``poll_interval_s`` or
  when a lease, a delay or a pause is due.

What a crash can lose or repeat
-------------------------------
A `PubAck` is returned after the commit, with the server's ``synchronous_commit``: the
message is as durable as the server makes it. A publish whose reply was lost may be retried
and stored twice unless it has a ``msg_id``. Group deliveries are at least once: a member
that dies has its leases expire after ``ack_wait_s`` (shared) or loses its partitions after
``session_timeout_s`` (ordered; its unacked batch is delivered again, with counts carried
on). By default (``durable_acks=False``) claims and settlements commit without waiting for the
WAL flush: a server crash can forget the last fraction of a second of them, and those
messages are delivered again. Dead-lettering is atomic with leaving the group. Core messages
are at most once: a subscriber whose LISTEN connection is down misses them (the connection
is re-established and its subscriptions registered again).
"""

from ._options import PostgresOptions
from ._transport import PostgresTransport

__all__ = ["PostgresOptions", "PostgresTransport"]
