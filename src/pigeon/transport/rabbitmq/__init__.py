"""The RabbitMQ transport (``amqp://user:password@host:port/vhost``): pigeon on RabbitMQ 3.10+.

Settings: `RabbitMQOptions`. Needs the ``rabbitmq`` extra (aio-pika) and RabbitMQ 3.10 or
later with the ``stream_queue`` and ``quorum_queue`` feature flags (on by default). No
plugin is needed: not the delayed-message exchange, not the management API, not the
stream protocol. Every exchange and queue starts with ``RabbitMQOptions.prefix``
(``pigeon``); ``<p>`` below stands for it.

Mapping of pigeon's concepts to RabbitMQ
----------------------------------------
- A **stream** is a durable topic exchange ``<p>.s.<stream>`` and one durable *stream
  queue* (``x-queue-type=stream``, RabbitMQ's append-only log) per **partition**,
  ``<p>.s.<stream>.<n>``, bound with ``<n>.#``. A stored message is published to the
  exchange with the routing key ``<n>.<subject>``: pigeon subjects use '.' between tokens,
  like routing keys. Keyed messages go to ``partition_for_key`` (as in every transport),
  unkeyed ones round the partitions. Retention: ``max_age_s`` -> ``x-max-age`` (whole
  seconds), ``max_bytes`` -> ``x-max-length-bytes`` split over the partitions; RabbitMQ
  trims whole segments, so smaller segments are configured. ``max_msgs`` is refused
  (`UnsupportedFeatureError`): stream queues cannot be trimmed by count.
- The **registry** of streams and groups is a log in the stream queue ``<p>.meta`` (see
  `._registry`): every transport replays it at open and follows it, the first record of a
  name wins, and a ``sync`` record makes reads linearizable. A stream created by another
  process is seen within milliseconds; a publish in that window is core-only. A publish to
  a stream another process deleted fails on the missing exchange, re-syncs and re-routes.
- **Offsets** are the stream queues' own: 0-based and dense per partition (RabbitMQ
  numbers every message of a stream queue). They are what ordered groups, dead letters
  (``Pigeon-Original-Offset``), `stream_state`, `StartAt.offset` and `lag` use.
  AMQP's publisher confirms do not say where a message was stored, so
  **``PubAck.offset`` is this publisher's own sequence number** for the partition (0, 1,
  2, ... per transport instance): increasing, unique for that publisher, not the stored
  position. Messages that reach a shared group through its queue's binding do not know
  their offset either: their ``Received.offset`` is -1 (copies made from the stream queues,
  see below, carry theirs).
- **Dedup** is refused: RabbitMQ has no deduplication, and pigeon could only emulate it per
  publisher process, which would not make two publishers' copies one. A publish with
  ``msg_id`` raises `UnsupportedFeatureError`. Every message carries its id
  (``message_id``), so consumers can be idempotent.
- pigeon's own data (key, microsecond timestamp, retry counts) travels in headers named
  ``x-pigeon-*``; user headers with that prefix, or RabbitMQ's own (``x-death``, ...), are
  refused. Routing keys hold 255 bytes: longer subjects are refused.

Core messaging
--------------
One durable topic exchange, ``<p>.core``. Each stream's exchange is bound to it (``#``),
so a stored publish also reaches core subscribers (one publish, one confirm); a core-only
publish goes there with the routing key ``_.<subject>``. A subscription is an exclusive,
auto-delete queue bound with ``*.<pattern>``, consumed without acks (at most once) and
capped at ``subscription_buffer`` messages (the oldest are dropped). Wildcards: ``*`` stays
``*``; ``>`` (one or more tokens) becomes ``*.#``, which is exact; a literal token ``#``
over-matches and is filtered locally. A queue group is one shared queue per (queue name,
pattern), which RabbitMQ round-robins between its members; it expires 5 s after its last
member left (what is published meanwhile goes to the next member). Request-reply:
each transport has an exclusive inbox queue bound to ``_._INBOX.<id>.*``; a request
carries its reply subject in ``reply_to`` (subscribers see it as ``Headers.REPLY_TO``)
and is published with ``mandatory``: a ``basic.return`` (no queue bound) raises
`NoRespondersError` at once. Requests are not stored.

Shared groups
-------------
A shared group is a durable quorum queue ``<p>.g.<stream>.<group>`` bound to the stream's
exchange (``#``): RabbitMQ copies every new message into it. Members compete for it.

- **History and replay** (emulated): RabbitMQ only routes new messages to a new queue. So
  creating a group (under a lock: an exclusive queue) binds its queue, waits
  ``bind_grace_s``, finds where each stream queue ends, and copies the messages from the
  group's start (earliest, an offset, or the first at a time) to that end into the queue.
  A message published while the group is being created can therefore be delivered twice
  (at least once); one whose routing was under way before the binding and that landed
  in the stream queue after the grace would be missed (not seen in practice: routing takes
  microseconds). A crash during the copy leaves the group with part of its history:
  delete it and create it again.
- **Fetch**: a member consumes the queue with a prefetch equal to the largest fetch it was
  asked for, capped at ``max_ack_pending`` (RabbitMQ's prefetch is per consumer, so that
  bound is per member, not per group), so RabbitMQ pushes it no more than a fetch can
  take; a fetch returns what has arrived as soon as anything has. Prefetch is fixed when a
  consumer starts, so a larger fetch adds a consumer for the difference: cancelling one
  would race (a message RabbitMQ assigns to a consumer being cancelled comes back with a
  delivery counted). A member that stops fetching keeps up to its prefetch until it
  fetches again or closes; closing puts the messages it never handed out back as copies,
  their delivery count unchanged.
- **Leases** (``ack_timeout``, ``in_progress``; emulated): a timer per delivery; when it
  fires the member requeues the message (``basic.nack``), and settling it then raises
  `DeliveryNotOwnedError`. The lease lives in the member's process: a member whose event
  loop is blocked keeps its messages (RabbitMQ's ``consumer_timeout`` closes its channel
  after 30 minutes by default); a member that dies returns them with its connection.
- **nack** (emulated ``delayed_nack``): the member publishes a copy carrying the delivery
  count and the failures so far (first and last failure time, last error) and acks the
  original. Without a delay the copy goes back into the group's queue; with one it goes to
  the retry queue ``<p>.w.<stream>.<group>.<k>`` holding delays up to 2**k ms, with a
  per-message expiration; expired messages dead-letter back into the group's queue. RabbitMQ
  expires messages from a queue's head only, so a retry waits at least its delay and at
  most about twice it (delays of one level differ by at most a factor of two).
- **Delivery count and max_deliver** (emulated): the count on a copy plus RabbitMQ's
  ``x-delivery-count`` (returns: expired leases, members that closed or died) plus one.
  A nack reaching ``max_deliver`` dead-letters the message; a message fetched beyond it
  (its last lease expired, its member died) is dead-lettered instead of delivered. The
  queue's ``x-delivery-limit`` is set one above as a backstop.
- **Dead letters** (emulated): pigeon builds the dead letter with `dead_letter_message`
  (every failure header) and publishes it into the stream ``<stream>-<group>-dlq`` (subject
  ``$DLQ.<stream>.<group>``), created with the group, then acks the original. The queue's
  dead-letter exchange points there too, as a backstop for what RabbitMQ drops itself
  (those letters carry RabbitMQ's ``x-death``, not pigeon's headers). `read_dead_letters`
  reads that stream.
- ``key_ordered`` shared groups are refused (`UnsupportedFeatureError`): use an ordered group.

Ordered groups (emulated)
-------------------------
Members read the partitions' stream queues themselves, in offset order, one outstanding
batch per partition, rewinding on a nack; single-active-consumer token queues decide who
reads each partition and heartbeats on a fanout exchange balance the partitions (members
beyond the partition count idle). Progress is committed after acks, never before, to a
one-message queue per partition. `._ordered` has the details. A member that dies returns
its tokens with its connection, but the others reassign its partitions only after
``session_timeout_s`` without its heartbeats; its unfinished batch is then delivered again,
counted. A nack's delay is kept by the owner only: a new owner reads the partition at once.
Ordered groups have no lease: a slow member keeps its batch while its connection lives.

Lag
---
Shared groups: one entry (partition -1, ``head`` and ``committed`` -1: the queue mixes the
partitions and has no offsets): ``pending`` is the queue's ready count (passive declare),
``waiting`` the retry queues', ``in_flight`` what this process's members hold or have
prefetched: AMQP cannot report unacknowledged counts (the management plugin can). Lag is
eventually consistent: acks have no answer, so a message just acked can still count.
Ordered groups: per partition, ``head`` = the stream queue's end, ``committed`` = the
commit record, ``in_flight`` the owner's batch when the owner is in this process.

Listing and purging
-------------------
`list_streams` names the registry's streams (after a ``sync``), dead-letter streams
included. Stream queues cannot be emptied (RabbitMQ answers ``queue.purge`` on one by
closing the connection), so `purge_stream` empties what can be emptied and marks the rest:

- it purges the queues of the stream's shared groups and their retry queues, then appends
  a ``purge`` record holding, per partition, the offset after the last message (the
  *floor*). `stream_state` counts from the floor, ordered members read from it (a running
  reader is restarted there), new groups never start below it, and `read_dead_letters` of
  a purged dead-letter stream starts there. The stream queues keep the bytes until their
  retention removes them.
- every stored publish carries its stream's purge count as the publisher's registry knows
  it (``x-pigeon-purges``). A shared member drops (acks) a message whose count is below the
  stream's: that removes the copies the queue purge could not reach, those members held
  unacknowledged at the time, when a nack, an expired lease or a member leaving brings
  them back. Settling a purged message a member still holds works as before.
- members in other processes apply the purge when the record reaches them (milliseconds):
  until then they can still hand out what they had prefetched. A publisher in another
  process that has not seen the record yet stamps the old count, so its message, though
  stored, is dropped by shared groups; a message published while a purge runs can be
  removed for some groups and not others.

What a crash can lose or repeat
-------------------------------
Stored messages are as durable as RabbitMQ makes them: a confirm comes once the stream
queue (and every group queue the message was routed to) has it; quorum queues fsync
before confirming, while stream queues, as RabbitMQ documents, leave flushing to the
operating system and rely on replication, so a single node can lose the last confirmed
messages in a power loss (not in a broker crash). A publish whose confirm was lost may be
retried and stored twice (no dedup).
Deliveries are at least once: members that die return their messages (shared) or token
(ordered) with their connection; an ordered batch acknowledged but not yet committed is
delivered again. A retry copy is published before the original is acked: a crash between
delivers it twice. Retry queues are classic queues, whose dead-lettering is at most once:
a broker crash at that moment can lose the retried message. Core messages are at most once.
A lost connection closes the transport (`TransportClosedError`): open a new one.
"""

from ._options import RabbitMQOptions
from ._transport import RabbitMQTransport

__all__ = ["RabbitMQOptions", "RabbitMQTransport"]
