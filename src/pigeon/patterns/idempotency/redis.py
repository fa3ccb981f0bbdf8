"""An idempotency store in Redis: light, but not transactional with the handler's writes.

Each claim is one key, ``<prefix><scope>:<key>``:

- entering sets it to ``processing:<token>`` if it does not exist (``SET NX``), with the
  lease ``lease_s`` as its expiry. If it holds ``done``, the message is a duplicate. If it
  holds another claim's ``processing:...``, another consumer is handling the message right
  now, or crashed less than ``lease_s`` ago: `ClaimInProgressError` is raised, with
  ``retry_after`` = the seconds left on that lease, so the caller can nack with that delay;
- a normal exit sets it to ``done`` with the expiry ``ttl_s`` (the dedup horizon; 7 days by
  default);
- an exception deletes it if it still holds this claim's token, so a redelivery processes the
  message again.

The guarantee is weaker than the SQL store's, and it matters which side effects the handler
has:

- a crash after the handler's side effects but before the ``done`` mark means the message is
  processed again when redelivered: effects are at least once, so they should be idempotent
  themselves;
- a crash mid-processing leaves ``processing`` behind: redeliveries are refused with
  `ClaimInProgressError` until the lease expires;
- a handler running longer than ``lease_s`` loses its claim, and a redelivery may then be
  processed concurrently: set ``lease_s`` above the handler's longest run (its timeout).

Retention is the expiry: ``done`` marks vanish after ``ttl_s``, so `forget_older_than`
deletes nothing. Scopes may not contain ``:``, which keeps the key unambiguous.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ...errors import ClaimInProgressError, InvalidIdempotencyKeyError
from .base import Claim, IdempotencyStore, validate_claim, validate_seconds

log = logging.getLogger("pigeon.patterns.idempotency")

DEFAULT_PREFIX = "pigeon:idem:"
DONE = "done"

# Claim if free; otherwise report what holds the key and for how long, read atomically with
# the failed SET so the key cannot expire in between.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1}
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

# Release only our own claim: after our lease expired the key may belong to another consumer.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Idempotency marks as Redis keys; `close` closes the client only when `from_url` made it."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_s: float = 60.0,
        ttl_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = round(validate_seconds(lease_s, "lease_s", positive=True) * 1000) or 1
        self.ttl_ms = round(validate_seconds(ttl_s, "ttl_s", positive=True) * 1000) or 1
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._owns_client = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisIdempotencyStore:
        """A store on a new client for ``url`` (``redis://127.0.0.1:6379/0``); options as `__init__`."""
        store = cls(Redis.from_url(url), **options)
        store._owns_client = True
        return store

    def key_for(self, key: str, scope: str) -> str:
        validate_claim(key, scope)
        if ":" in scope:
            raise InvalidIdempotencyKeyError(f"a Redis idempotency scope may not contain ':', got {scope!r}")
        return f"{self.prefix}{scope}:{key}"

    @asynccontextmanager
    async def claim(self, key: str, *, scope: str) -> AsyncIterator[Claim]:
        name = self.key_for(key, scope)
        token = f"processing:{uuid.uuid4().hex}"
        claimed, *held = await self._claim(keys=[name], args=[token, self.lease_ms])
        if not claimed:
            value, ttl_ms = _text(held[0]), int(held[1])
            if value == DONE:
                yield Claim(duplicate=True)
                return
            # A key without expiry was not written by this store; retry after a full lease.
            retry_after = ttl_ms / 1000 if ttl_ms > 0 else self.lease_ms / 1000
            raise ClaimInProgressError(
                f"message {key!r} of scope {scope!r} is being processed by another consumer "
                f"(or one that crashed); its claim expires in {retry_after:.3f} s",
                retry_after=retry_after,
            )
        try:
            yield Claim(duplicate=False)
        except BaseException:
            await self._release_quietly(name, token)
            raise
        # Unconditional: even if our lease ran out and another consumer took over, the
        # message has been processed.
        await self.client.set(name, DONE, px=self.ttl_ms)

    async def _release_quietly(self, name: str, token: str) -> None:
        # The handler's exception matters more; an unreleased claim expires with its lease.
        try:
            await self._release(keys=[name], args=[token])
        except RedisError as exc:
            log.warning("could not release idempotency claim %s (%r); it expires with its lease", name, exc)

    async def forget_older_than(self, seconds: float) -> int:
        """Nothing to do: ``done`` marks expire ``ttl_s`` after they were set."""
        validate_seconds(seconds, "forget_older_than seconds")
        return 0

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
