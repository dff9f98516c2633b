"""Outbound delivery: retried with backoff, receipts kept, claimed from dead consumers, dead-lettered at last."""

from __future__ import annotations

from bot.events import ChannelRef
from bot.keys import Keys
from bot.outbox import Outbound, OutboxConsumer, Receipt, outbox_command
from bot.runtime import Deps


class Flaky(Exception):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("channel said no")
        self.retry_after = retry_after


def message(n: int) -> Outbound:
    return Outbound(
        id=f"e{n}", thread_id="t1", ref=ChannelRef(kind="fake", address="room"), kind="text", text=f"hello {n}"
    )


async def put(deps: Deps, keys: Keys, *msgs: Outbound) -> None:
    for m in msgs:
        await deps.redis.execute_command(*outbox_command(keys, m))


async def test_a_failing_delivery_is_retried_then_its_receipt_is_kept(deps: Deps) -> None:
    attempts: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        attempts.append(msg.id)
        if len(attempts) < 3:
            raise Flaky(retry_after=0.01)  # e.g. Slack's 429 with Retry-After
        return Receipt(channel_id="ts-1")

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, base_delay=0.01)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1))
    assert await consumer.run_once(block_ms=100) == 1
    assert attempts == ["e1", "e1", "e1"]
    assert await deps.redis.hgetall(deps.keys.receipts("t1")) == {b"fake:e1": b"ts-1"}
    assert await deps.redis.xlen(deps.keys.outbox("fake")) == 0, "delivered entries are removed"
    assert await consumer.run_once(block_ms=50) == 0, "and not delivered again"


async def test_an_entry_left_pending_by_a_dead_consumer_is_claimed_and_delivered(deps: Deps) -> None:
    delivered: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        delivered.append(msg.text)
        return Receipt(channel_id=msg.id)

    dead = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, consumer="dead")
    await dead.ensure_group()
    await put(deps, deps.keys, message(1), message(2))
    # the dead consumer read both entries and died before delivering them
    await deps.redis.xreadgroup(dead.group, "dead", {dead.stream: ">"}, count=10)
    alive = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, consumer="alive", claim_idle_ms=0)
    assert await alive.run_once(block_ms=50) == 2
    assert delivered == ["hello 1", "hello 2"]
    assert (await deps.redis.xpending(dead.stream, dead.group))["pending"] == 0


async def test_a_delivery_that_never_succeeds_is_dead_lettered_and_can_be_retried(deps: Deps) -> None:
    async def deliver(msg: Outbound) -> Receipt:
        raise Flaky()

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, max_attempts=3, base_delay=0.001)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(7))
    assert await consumer.run_once(block_ms=100) == 0
    [(dlq_id, fields)] = await deps.bus.dead_letters()
    assert fields["error"] == "Flaky: channel said no" and fields["thread_id"] == "t1"
    assert await deps.redis.xlen(consumer.stream) == 0

    await deps.bus.retry_dead_letter(dlq_id)
    assert await deps.bus.dead_letters() == []
    got: list[str] = []

    async def works(msg: Outbound) -> Receipt:
        got.append(msg.text)
        return Receipt(channel_id="ok")

    consumer.deliver = works
    assert await consumer.run_once(block_ms=100) == 1
    assert got == ["hello 7"]
