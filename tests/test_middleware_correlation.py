"""Correlation and causation ids propagate from consumed to published messages."""

from __future__ import annotations

from typing import Any

from app_helpers import until
from pigeon.app import App, Context
from pigeon.app.middleware import compose, correlation
from pigeon.message import Headers, Message
from pigeon.transport import connect
from pigeon.transport.base import StreamSpec


async def test_a_message_starts_a_conversation_and_its_descendants_keep_it() -> None:
    transport = await connect("memory://")
    await transport.create_stream(StreamSpec("flow", ("flow.>",)))
    app = App(transport)
    seen: dict[str, Message] = {}

    @app.subscriber("flow.order", stream="flow", group="a", publish_to="flow.invoice")
    async def order(text: str, message: Message) -> str:
        seen["order"] = message
        return "invoice"

    @app.subscriber("flow.invoice", stream="flow", group="b")
    async def invoice(text: str, message: Message, ctx: Context) -> None:
        seen["invoice"] = message
        await ctx.publish("flow.mail", "mail")

    @app.subscriber("flow.mail", stream="flow", group="c")
    async def mail(text: str, message: Message) -> None:
        seen["mail"] = message

    try:
        async with app:
            await app.publish("flow.order", "order")
            assert await until(lambda: len(seen) == 3)
    finally:
        await transport.close()
    first, second, third = seen["order"], seen["invoice"], seen["mail"]
    assert Headers.CORRELATION_ID not in first.headers, "the first message starts the conversation"
    assert second.headers[Headers.CORRELATION_ID] == first.id
    assert second.headers[Headers.CAUSATION_ID] == first.id
    assert third.headers[Headers.CORRELATION_ID] == first.id, "kept over every hop"
    assert third.headers[Headers.CAUSATION_ID] == second.id


async def test_an_existing_correlation_id_is_kept() -> None:
    class Ctx:
        message = Message("a.b", headers={Headers.CORRELATION_ID: "c-1"}, id="m-2")
        publish_headers: dict[str, str] = {}

    async def inner(ctx: Any) -> str:
        return "done"

    ctx = Ctx()
    assert await compose([correlation], inner)(ctx) == "done"  # type: ignore[arg-type]
    assert ctx.publish_headers == {Headers.CORRELATION_ID: "c-1", Headers.CAUSATION_ID: "m-2"}
