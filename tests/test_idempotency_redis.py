"""The Redis idempotency store: duplicates per scope, a claim in progress refused with the time
its lease has left, release on an exception, a crashed claim blocking until its lease expires,
and the expiry of ``done`` marks.

Every test uses a key prefix of its own and deletes its keys at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from pigeon.errors import ClaimInProgressError, InvalidConfigError, InvalidIdempotencyKeyError
from pigeon.patterns.idempotency import RedisIdempotencyStore
from pigeon.testing.services import require_service, unique_name

MakeStore = Callable[..., Awaitable[RedisIdempotencyStore]]


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    client = Redis.from_url(require_service("redis"))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make_store(client: Redis) -> AsyncIterator[MakeStore]:
    """``await make_store(**options)``: a store on its own prefix; its keys are deleted after."""
    stores: list[RedisIdempotencyStore] = []

    async def make(**options: object) -> RedisIdempotencyStore:
        store = RedisIdempotencyStore.from_url(
            require_service("redis"), prefix=f"{unique_name('idem')}:", **options
        )
        stores.append(store)
        return store

    try:
        yield make
    finally:
        for store in stores:
            async for key in client.scan_iter(match=f"{store.prefix}*"):
                await client.delete(key)
            await store.close()


async def is_duplicate(store: RedisIdempotencyStore, key: str, scope: str) -> bool:
    async with store.claim(key, scope=scope) as claim:
        return claim.duplicate


async def test_a_finished_claim_is_a_duplicate_in_its_scope_only(
    make_store: MakeStore, client: Redis
) -> None:
    store = await make_store()
    async with store.claim("m1", scope="billing") as claim:
        assert not claim.duplicate
        assert claim.session is None
        value = await client.get(f"{store.prefix}billing:m1")
        assert isinstance(value, bytes) and value.startswith(b"processing:")
    assert await client.get(f"{store.prefix}billing:m1") == b"done"
    async with store.claim("m1", scope="billing") as again:
        assert again.duplicate
    assert not await is_duplicate(store, "m1", scope="shipping")
    assert not await is_duplicate(store, "m2", scope="billing")


async def test_done_marks_expire_after_ttl(make_store: MakeStore, client: Redis) -> None:
    store = await make_store(lease_s=30, ttl_s=120)
    async with store.claim("m1", scope="g"):
        assert 25_000 < await client.pttl(f"{store.prefix}g:m1") <= 30_000
    assert 115_000 < await client.pttl(f"{store.prefix}g:m1") <= 120_000
    assert await store.forget_older_than(0) == 0


async def test_a_claim_in_progress_is_refused_with_its_remaining_lease(make_store: MakeStore) -> None:
    store = await make_store(lease_s=5)
    async with store.claim("m1", scope="g") as claim:
        assert not claim.duplicate
        with pytest.raises(ClaimInProgressError) as refused:
            async with store.claim("m1", scope="g"):
                pytest.fail("a claim in progress was claimed twice")
        assert 4 < refused.value.retry_after <= 5
    assert await is_duplicate(store, "m1", scope="g")


async def test_an_exception_releases_the_claim(make_store: MakeStore, client: Redis) -> None:
    store = await make_store()
    with pytest.raises(RuntimeError, match="handler failed"):
        async with store.claim("m1", scope="g"):
            raise RuntimeError("handler failed")
    assert await client.exists(f"{store.prefix}g:m1") == 0
    assert not await is_duplicate(store, "m1", scope="g")


async def test_a_crashed_claim_blocks_until_its_lease_expires(make_store: MakeStore, client: Redis) -> None:
    store = await make_store(lease_s=1)
    name = f"{store.prefix}g:m1"
    crashed = store.claim("m1", scope="g")
    assert not (await crashed.__aenter__()).duplicate  # and never exited: the consumer died
    with pytest.raises(ClaimInProgressError) as refused:
        await is_duplicate(store, "m1", scope="g")
    assert 0 < refused.value.retry_after <= 1

    await asyncio.sleep(refused.value.retry_after + 0.05)
    assert await client.exists(name) == 0
    successor = store.claim("m1", scope="g")
    assert not (await successor.__aenter__()).duplicate
    successor_value = await client.get(name)

    # The crashed claim's late failure must not release the successor's claim.
    assert not await crashed.__aexit__(RuntimeError, RuntimeError("late"), None)
    assert await client.get(name) == successor_value
    await successor.__aexit__(None, None, None)
    assert await client.get(name) == b"done"


async def test_a_client_decoding_responses_works_too(client: Redis) -> None:
    decoding = Redis.from_url(require_service("redis"), decode_responses=True)
    store = RedisIdempotencyStore(decoding, prefix=f"{unique_name('idem')}:", lease_s=5)
    try:
        async with store.claim("m1", scope="g"):
            with pytest.raises(ClaimInProgressError):
                await is_duplicate(store, "m1", scope="g")
        assert await is_duplicate(store, "m1", scope="g")
        await store.close()
        assert await decoding.ping()  # a client the store was given stays open
    finally:
        await client.delete(f"{store.prefix}g:m1")
        await decoding.aclose()


@pytest.mark.parametrize(
    ("key", "scope"),
    [("", "g"), ("m", ""), ("k" * 256, "g"), ("m", "s" * 256), (None, "g"), ("m", "a:b")],
)
async def test_bad_keys_and_scopes_are_refused(
    make_store: MakeStore, client: Redis, key: object, scope: object
) -> None:
    store = await make_store()
    with pytest.raises(InvalidIdempotencyKeyError):
        async with store.claim(key, scope=scope):  # type: ignore[arg-type]
            pytest.fail("a bad key was claimed")
    assert [key async for key in client.scan_iter(match=f"{store.prefix}*")] == []


@pytest.mark.parametrize(
    "options", [{"lease_s": 0}, {"ttl_s": -1}, {"lease_s": float("nan")}, {"ttl_s": "7d"}]
)
def test_bad_durations_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(InvalidConfigError):
        RedisIdempotencyStore(Redis(), **options)  # type: ignore[arg-type]
