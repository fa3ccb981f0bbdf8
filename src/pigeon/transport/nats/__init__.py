"""The NATS transport (``nats://host:port``): pigeon on NATS core and JetStream (nats-py).

Settings: `NatsOptions`. Needs the ``nats`` extra and a server with JetStream (tested on
nats-server 2.9; delayed naks need 2.7.1 or later). Without JetStream, core messaging works
and every publish returns None.

Mapping of pigeon's concepts to NATS
------------------------------------
- Core publish, subscribe, queue groups, request-reply: NATS's own. ``NoRespondersError``
  comes from NATS's no-responders status, `RequestTimeoutError` from the request timeout. A
  subscription's message carries its reply subject as ``Headers.REPLY_TO``. Patterns that
  start with a wildcard do not see ``$...`` or ``_INBOX.`` subjects (NATS's own traffic).
- Message fields on the wire: headers as NATS headers (a value NATS would alter, with
  surrounding spaces or line breaks, travels base64-encoded and is decoded on receipt); the
  key as ``Pigeon-Key``; an explicit ``msg_id`` as ``Nats-Msg-Id`` (JetStream's dedup id);
  stored messages without one get a generated id in ``Pigeon-Msg-Id``, stable across
  redeliveries. Core-only messages without headers, key or id are plain NATS messages.
- A stream with one partition is a JetStream stream of the same name capturing the same
  subjects, created with limits retention (``max_age_s``, ``max_msgs``, ``max_bytes``) and
  ``duplicate_window`` = ``dedup_window_s`` (JetStream allows no less than 100 ms, nor more
  than ``max_age``; 0 becomes 100 ms). One publish both reaches core subscribers and is
  stored, as NATS does it: a duplicate therefore still reaches core subscribers. Offsets are
  JetStream sequences minus one (dense: 0, 1, 2...). Streams created outside pigeon work too,
  as one partition.
- Which stream captures a subject: pigeon keeps a table of every stream's subjects
  (``STREAM.LIST``), listed again when older than ``route_cache_s``, and matches locally, so
  subjects of any cardinality cost no lookup. A stream another process creates is noticed
  within that time (meanwhile its subjects' messages are stored, but the publish returns
  None); one that was deleted answers no-responders, which makes pigeon list again.
- ``list_streams`` names the streams pigeon created (their description says so), dead-letter
  streams included; not the partitions' own streams, the ordered groups' KV buckets, nor
  other applications' streams. ``purge_stream`` purges each partition's stream up to its
  last sequence; offsets continue. JetStream moves every consumer past the purged messages
  and forgets their unacknowledged deliveries and delayed naks; a delivery a member holds
  can still be settled (JetStream ignores it). Members drop what they had prefetched of the
  purged messages: in this process before the purge returns, in others when the notice on
  ``$PGNC.<stream>`` reaches them (a fetch in between may still hand one out). An ordered
  partition paused by a delayed nack stays paused for the rest of the delay.
- Dedup: JetStream's, within ``duplicate_window``; a duplicate's `PubAck` has the original's
  offset and ``duplicate=True``.
- Replay: earliest = DeliverAll, latest = DeliverNew, offset n = DeliverByStartSequence
  n + 1 (on every partition), time = DeliverByStartTime.
- Lag (consumer info, per partition): ``head`` = the stream's last sequence, ``lag`` =
  ``num_pending`` + ``num_ack_pending`` (what the group has not finished), ``committed`` =
  head - lag, ``pending`` = ``num_pending``, ``in_flight`` = ``num_ack_pending`` (including
  naks waiting for their delay: JetStream does not tell them apart, so ``waiting`` is 0).

Partitions (emulated)
---------------------
A stream with N > 1 partitions is N JetStream streams ``<stream>~<p>`` (``~`` cannot occur in
a pigeon name) capturing ``$PGN.<stream>.<p>.>``, plus a sealed (storing nothing) memory
stream named ``<stream>`` that captures the pigeon stream's subjects: JetStream then keeps
other streams off those subjects, publishers find the layout (in its description), and a raw
JetStream publish to them fails loudly instead of vanishing. A pigeon publish stores the
message on ``$PGN.<stream>.<p>.<subject>`` (awaiting the `PubAck`) and then publishes it to
``<subject>`` for core subscribers (skipped for duplicates). The trade-off: two messages on
the wire per publish, and the two are not atomic (a crash between them stores the message
without core delivery, which is at-most-once anyway); messages published to the subject by
plain NATS clients reach core subscribers but are not stored. Keyed messages go to
``partition_for_key(key)``, unkeyed ones with a ``msg_id`` to ``partition_for_key(msg_id)``
(so a retry meets its first copy's dedup window), the rest round-robin. Retention limits
apply per partition stream: ``max_msgs`` and ``max_bytes`` are split evenly. Offsets are
each partition stream's sequences minus one.

Shared groups
-------------
A durable pull consumer named like the group on each partition's stream; see `._groups`.
``ack_wait_s`` is the consumer's AckWait; ``in_progress`` is ``+WPI``; ``nack(delay)`` is a
delayed ``-NAK``. ``backoff`` gives nack delays (``Backoff.delay(n)``); JetStream's own
BackOff is not used, since it replaces the ack wait of each delivery rather than adding a
wait after a failure, so an expired lease is redelivered at once. ``max_ack_pending`` is split
evenly over the partitions' consumers. ``max_deliver``: JetStream's limit is set one higher,
so that a message whose last allowed delivery timed out is delivered once more, and pigeon
dead-letters it instead of handing it out. A member's fetch sends one pull request per
partition, splitting its batch over them; requests that outlive the fetch fill a local
buffer that the next fetch takes first (prefetch: the group's lag may show them in flight),
dropping what waited there longer than ``ack_wait_s``. Settling after the lease ran out
raises `DeliveryNotOwnedError`. Closing a member naks what it holds. Key-ordered shared
groups are refused (`UnsupportedFeatureError`): use an ordered group.

Ordered groups (emulated)
-------------------------
A durable pull consumer per partition, read by one member at a time, with ownership agreed
in a KV bucket ``PGN<len>_<stream>_<group>`` whose TTL is the session timeout; see
`._ordered` for the protocol. In short: members heartbeat, compute the same assignment, claim
free partitions with ``kv.create`` and keep them with revision-checked updates; a member that
dies loses its partitions when its keys expire. One outstanding batch per partition; acks are
sent (committed) for the settled prefix only; a nack naks the rest in offset order and pauses
the partition for the delay (recorded in the bucket so a new owner waits too).
``max_deliver`` is checked at nack time, like the embedded engine (JetStream counts every
delivery, including the redeliveries of a rewind).

Dead letters (emulated)
-----------------------
JetStream has none. On ``term``, or on a failure of a message that reached ``max_deliver``,
pigeon publishes the dead letter (`dead_letter_message`: payload, key, headers and the
failure headers) to ``$DLQ.<stream>.<group>``, captured by the stream
``<stream>-<group>-dlq`` (created on first use with unlimited retention; create it yourself
to choose), with ``Nats-Msg-Id`` = ``dlq:<stream>:<p>:<offset>``, and only then terms the
original. The failure history (first failure time, last error) is known to the process that
saw the failures; a message whose failures happened in several processes records the ones
this process saw (or "not acknowledged within ack_wait" for an expired last lease).
Deleting a stream deletes its dead-letter streams and its groups' buckets; deleting a group
keeps its dead letters.

What a crash can lose or repeat
-------------------------------
Stored messages are as durable as JetStream makes them (file storage by default,
``replicas`` copies). A publish whose acknowledgement was lost may be retried and stored twice
unless it has a ``msg_id``. Acks are sent without waiting for the server's confirmation: one
lost in a crash means a redelivery. Deliveries are at least once: a shared member's leases
come back after ``ack_wait_s``; an ordered member's batch comes back within half the session
timeout and its partitions move after the session timeout; acks of an ordered batch that were
not yet committed (not a settled prefix) are delivered again. A dead letter written just
before a crash is written again with the same id, which JetStream drops within the DLQ
stream's dedup window. Core messages are at most once.
"""

from ._options import NatsOptions
from ._transport import NatsTransport

__all__ = ["NatsOptions", "NatsTransport"]
