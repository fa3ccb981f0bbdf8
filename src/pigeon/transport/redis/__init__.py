"""The Redis transport (``redis://host:port/db``): pigeon on Redis 7 streams and pub/sub.

Settings: `RedisOptions`. Needs the ``redis`` extra (redis-py's asyncio client) and Redis 7.0
or later (XAUTOCLAIM reporting deleted entries, XTRIM MINID). One Redis server (or a primary
with replicas); Redis Cluster is not supported, since one script touches the keys of several
partitions. Every key and channel starts with ``RedisOptions.prefix`` (``pigeon``).

Mapping of pigeon's concepts to Redis
-------------------------------------
- A stream is registered in the hash ``pigeon:streams`` (name -> spec, JSON). Each change
  bumps ``pigeon:streams:v``; every publish passes the version it routed with, and the
  publish script refuses a stale one (the publisher reloads the registry and retries), so a
  publish never lands in a deleted stream or misses a new one.
- A partition is a Redis stream, ``pigeon:s:<stream>:<p>``. Keyed messages go to
  ``partition_for_key`` (as in every transport); unkeyed ones go round the partitions.
- Offsets: Redis ids (``ms-seq``) are not dense, so the publish script takes the next offset
  from a counter (``HINCRBY pigeon:m:<stream> n:<p>``) and stores it in the entry's ``o``
  field, in the same script as the XADD: offsets are 0-based and dense per partition. Redis's
  ids give the timestamps (the server's clock) and ``StartAt.time``; ``StartAt.offset`` is
  resolved by a binary search over ids (offsets grow with ids).
- Dedup: the publish script checks and sets ``pigeon:d:<stream>:<msg_id>`` (``SET PX`` =
  the dedup window, holding ``partition:offset``) atomically with the XADD; a duplicate
  returns the original position with ``duplicate=True`` and reaches no core subscriber.
- Retention, on each publish: ``max_msgs`` -> ``XADD MAXLEN ~ ceil(max_msgs / partitions)``
  per partition, ``max_age_s`` -> ``XTRIM MINID ~ now - max_age``. Approximations: ``~``
  trims whole internal nodes, so a partition can keep up to ~100 entries more than its share
  (``RedisOptions(exact_trim=True)`` trims exactly, at some cost); the count limit is split
  evenly over partitions rather than applied to their total; age is enforced when a partition
  is written to (and by `stream_state`), not by a timer. ``max_bytes`` is refused
  (`UnsupportedFeatureError`): Redis cannot trim by size.
- Deleting a stream deletes its partitions, dedup keys, groups, and its groups' dead-letter
  streams.
- ``list_streams`` names the registry's streams, dead-letter streams included (not those of
  other prefixes). ``purge_stream`` empties every partition (``XTRIM MAXLEN 0``) in one
  transaction with its groups' delayed nacks, failure records and ordered pauses: every one
  of those is about a message that was delivered, hence purged. Groups, their positions, the
  offset counters and dedup keys stay. Entries a member holds stay pending: settling them
  works, and an expired lease, a nack's redelivery or a new owner's re-read finds the entry
  gone and drops it.

Core messaging (emulated on pub/sub)
------------------------------------
- A publish is one script: stored (if a stream captures the subject) and PUBLISHed on
  ``pigeon:c:<subject>`` as a frame carrying subject, headers, key, id and reply subject.
  Core delivery is at most once: a subscriber that is disconnected misses messages.
- Wildcards: a literal subject is a SUBSCRIBE; a pattern is a PSUBSCRIBE to a glob (``*`` ->
  ``*``, ``>`` -> ``*``) that can over-match (a glob ``*`` crosses dots), filtered locally
  with `pigeon.subjects.matches`.
- Queue groups: each member listens on a channel of its own (``pigeon:qm:<id>``) and
  registers ``<queue>\\n<pattern>`` in the hash ``pigeon:q``. The publish script matches
  the subject against the registrations and PUBLISHes to one member of each matching queue
  group, picked by the server clock's microseconds; a member whose channel has no listener is
  dropped from the hash (live members re-register every few seconds). This costs the publish
  script a scan of the registrations whenever any exist.
- Request-reply: each transport PSUBSCRIBEs once to its own inbox ``_INBOX.<id>.*``; a
  request carries its reply subject in the frame (subscribers see it as
  ``Headers.REPLY_TO``). PUBLISH answers how many subscribers got the message: none (and no
  queue member) raises `NoRespondersError` at once. A subscriber whose glob over-matches the
  subject counts as a receiver, so such a request times out instead.

Shared groups (Redis consumer groups)
-------------------------------------
A pigeon group is a Redis consumer group named like it on every partition; its spec is kept
in ``pigeon:g:<stream>``, and joining with a different spec raises `GroupExistsError`. A fetch
is one script that, up to the room asked for: (1) moves due delayed nacks back to the PEL, (2)
takes expired leases with XAUTOCLAIM (min idle = ``ack_wait_s``), (3) reads new entries with
XREADGROUP while the group's unsettled messages (PELs + delayed) stay under
``max_ack_pending``. With nothing to hand out, it blocks on XREADGROUP for new entries, up to
``claim_interval_s`` at a time (so expired leases are noticed within that interval).

- Leases: an entry's PEL idle time is its lease, its PEL delivery counter the
  ``delivery_count``. Settling checks (in the script) that the member still holds that very
  delivery (consumer and count): otherwise `DeliveryNotOwnedError`. An ack that comes after
  ``ack_wait`` but before another member took the message still counts.
- ``in_progress``: XCLAIM to itself with JUSTID resets the idle time, not the count.
- ``nack(delay)``: the entry leaves the PEL (XACK) and waits in the zset
  ``pigeon:gd:<stream>:<group>`` (``<p>|<id>`` -> due time); a later fetch puts it back with
  ``XCLAIM FORCE RETRYCOUNT count+1``. It is never redelivered before the due time (server
  clock). Without a delay, the group's backoff (or 0) applies.
- ``max_deliver``, ``term``: failures are noted in ``pigeon:gf:<stream>:<group>`` (first and
  last failure, last error) for the dead letter's headers. Giving up publishes the dead
  letter (`dead_letter_message`, to the stream ``<stream>-<group>-dlq`` created on first use)
  and then acks; a crash between the two redelivers the message, and the dead letter's id
  makes the second one a duplicate. A lease that expires on the last allowed delivery is
  dead-lettered when next claimed. Expired leases are redelivered at once (the backoff applies
  to nacks only).
- Closing a member moves what it had not settled to a pseudo-consumer ``~released``, already
  idle for ``ack_wait``, so the next fetch of any member takes it (counting a delivery).
- ``max_ack_pending`` is checked in the fetch script; members blocked waiting for new entries
  at the same moment can overshoot it by their batch sizes.
- ``key_ordered`` shared groups are refused (`UnsupportedFeatureError`): use an ordered group,
  which keeps every key in order.

Ordered groups (emulated)
-------------------------
Members keep a session in ``pigeon:om:<stream>:<group>`` (a zset of member tokens -> expiry),
refreshed by a heartbeat every ``heartbeat_interval_s``. Each partition has a lock
``pigeon:ol:<stream>:<group>:<p>`` (``SET NX PX session_timeout``) renewed by its holder.
Every member derives the same assignment from the sorted list of live members (member i gets
the partitions p with p % members == i; members beyond the partition count idle), takes free
partitions of its share, and hands over the ones that are no longer its share once their
outstanding batch is settled (or after ``ack_wait_s`` if it is not). A member that dies loses
its locks after ``session_timeout_s``. See `._ordered` for reading, acks and nacks: one
outstanding batch per partition; the pending entries of a partition are always re-read first
and in order; commits are XACKs under the partition lock, after the acks, never before; a
nack rewinds to the first unsettled message and pauses the partition for the delay
(``pigeon:op:...``, kept in Redis, so a new owner also waits). The first pending entry a
failed member left is counted as one more delivery (it was the one being processed), so a
message that keeps crashing its members reaches ``max_deliver``. Ordered groups use no
per-message lease: a slow member keeps its batch as long as it heartbeats.

Lag (``XINFO GROUPS`` plus the offsets): ``head`` is the next offset, ``committed`` the lowest
unfinished offset (oldest pending or delayed entry, else the first never delivered);
``pending`` counts never-delivered messages, ``in_flight`` the PEL, ``waiting`` the delayed.

What a crash can lose or repeat
-------------------------------
Stored messages are as durable as the server's persistence makes them (AOF with
``appendfsync always`` or ``everysec``, or RDB snapshots): pigeon does not change it. A
publish whose reply was lost may be retried and stored twice unless it has a ``msg_id``.
Deliveries are at least once: a member that dies redelivers its leases after ``ack_wait``
(shared) or its batch after the session timeout (ordered); acks of an ordered batch not yet
committed are delivered again. A fetch cancelled while blocked can leave new entries in its
member's PEL; they are redelivered after ``ack_wait``. Core messages are at most once. Redis
consumer records of members that died are left behind until their group is deleted.
"""

from ._options import RedisOptions
from ._transport import RedisTransport

__all__ = ["RedisOptions", "RedisTransport"]
