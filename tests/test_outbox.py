"""Outbound delivery: failures set aside and retried without holding up other threads, receipts kept, claimed
from dead consumers, permanent failures and malformed entries dead-lettered at once, nothing undelivered trimmed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from bot.errors import PermanentDeliveryError
from bot.events import ChannelRef
from bot.keys import Keys
from bot.outbox import Outbound, OutboxConsumer, Receipt, backoff, outbox_command
from bot.runtime import Deps


class Flaky(Exception):
    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("channel said no")
        self.retry_after = retry_after


def message(n: int, thread: str = "t1") -> Outbound:
    return Outbound(
        id=f"e{n}", thread_id=thread, ref=ChannelRef(kind="fake", address="room"), kind="text", text=f"hello {n}"
    )


async def put(deps: Deps, keys: Keys, *msgs: Outbound) -> None:
    for m in msgs:
        await deps.redis.execute_command(*outbox_command(keys, m))


Check = Callable[[], Awaitable[bool] | bool]


async def holds(check: Check) -> bool:
    result = check()
    return result if isinstance(result, bool) else await result


async def eventually(check: Check, timeout: float = 5.0) -> None:
    """Wait until ``check`` holds (something else does the work)."""
    for _ in range(int(timeout / 0.01)):
        if await holds(check):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("it never got there")


async def pump_until(consumer: OutboxConsumer, done: Check, timeout: float = 5.0) -> None:
    """Run the consumer until ``done`` holds (the way run() would, without a background task)."""
    deadline = time.monotonic() + timeout
    while not await holds(done):
        assert time.monotonic() < deadline, "the outbox never got there"
        await consumer.run_once(block_ms=20)


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
    await pump_until(consumer, lambda: len(attempts) == 3)
    assert attempts == ["e1", "e1", "e1"]
    assert await deps.redis.hgetall(deps.keys.receipts("t1")) == {b"fake:e1": b"ts-1"}
    assert await deps.redis.xlen(deps.keys.outbox("fake")) == 0, "delivered entries are removed"
    assert await consumer.waiting() == 0 and await deps.redis.keys(f"{consumer.due}*") == []
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
    tried: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        tried.append(msg.id)
        raise Flaky()

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, max_attempts=3, base_delay=0.001)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(7))

    async def dead() -> bool:
        return bool(await deps.bus.dead_letters())

    await pump_until(consumer, dead)
    assert tried == ["e7"] * 3
    [(dlq_id, fields)] = await deps.bus.dead_letters()
    assert fields["error"] == "Flaky: channel said no" and fields["thread_id"] == "t1"
    assert await deps.redis.xlen(consumer.stream) == 0 and await consumer.waiting() == 0

    await deps.bus.retry_dead_letter(dlq_id)
    assert await deps.bus.dead_letters() == []
    got: list[str] = []

    async def works(msg: Outbound) -> Receipt:
        got.append(msg.text)
        return Receipt(channel_id="ok")

    consumer.deliver = works
    assert await consumer.run_once(block_ms=100) == 1
    assert got == ["hello 7"]


async def test_a_permanent_failure_is_dead_lettered_at_once_and_other_threads_go_out(deps: Deps) -> None:
    """One message the channel will never take costs the others nothing: they go out within a second."""
    delivered: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        if msg.thread_id == "bad":
            raise PermanentDeliveryError("channel_not_found")
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, base_delay=1.0)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1, "bad"), message(2, "t2"), message(3, "bad"), message(4, "t3"))
    t0 = time.monotonic()
    await pump_until(consumer, lambda: len(delivered) == 2, timeout=1.0)
    assert time.monotonic() - t0 < 1.0 and delivered == ["e2", "e4"]
    letters = await deps.bus.dead_letters()
    assert [(f["thread_id"], f["error"]) for _, f in letters] == [
        ("bad", "PermanentDeliveryError: channel_not_found")
    ] * 2
    assert [json.loads(f["payload"])["id"] for _, f in letters] == ["e1", "e3"]
    assert await deps.redis.xlen(consumer.stream) == 0 and await consumer.waiting() == 0


async def test_delivery_failures_are_logged_and_dead_lettered_without_credentials(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP client's error names the URL it called, token and all: neither the log nor the dead letter keeps it."""
    secret = "s3cr3t-hook-token-0123"

    async def deliver(msg: Outbound) -> Receipt:
        url = f"https://hooks.example.com/in?token={secret}"
        if msg.thread_id == "bad":
            raise PermanentDeliveryError(f"POST {url} answered 400")
        raise ConnectionError(f"cannot connect to {url} (Authorization: Bearer {secret})")

    caplog.set_level(logging.WARNING, logger="bot.outbox")
    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, base_delay=0.05, max_attempts=2)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1, "bad"), message(2, "flaky"))

    async def both_dead() -> bool:
        return len(await deps.bus.dead_letters()) == 2

    await pump_until(consumer, both_dead)
    errors = [f["error"] for _, f in await deps.bus.dead_letters()]
    assert errors == [
        "PermanentDeliveryError: POST https://hooks.example.com/in?token=*** answered 400",
        "ConnectionError: cannot connect to https://hooks.example.com/in?token=*** (Authorization: Bearer ***)",
    ]
    assert caplog.records and not any(secret in r.getMessage() for r in caplog.records)


async def test_a_retryable_failure_holds_back_only_its_own_thread_and_order_is_kept(deps: Deps) -> None:
    """A's first message fails for now: B's go out meanwhile, A's second waits until A's first went."""
    delivered: list[str] = []
    a_down = True

    async def deliver(msg: Outbound) -> Receipt:
        if msg.thread_id == "A" and a_down:
            raise Flaky()
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, base_delay=0.05, max_attempts=100)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1, "A"), message(2, "B"), message(3, "A"), message(4, "B"))
    await pump_until(consumer, lambda: len(delivered) == 2)
    assert delivered == ["e2", "e4"], "B was not held up"
    await put(deps, deps.keys, message(5, "B"), message(6, "A"))
    await pump_until(consumer, lambda: len(delivered) == 3)
    await consumer.run_once(block_ms=100)
    assert delivered == ["e2", "e4", "e5"], "A's later messages wait behind its first"
    assert await consumer.waiting() == 3

    a_down = False
    await pump_until(consumer, lambda: len(delivered) == 6)
    assert delivered == ["e2", "e4", "e5", "e1", "e3", "e6"]
    assert await consumer.waiting() == 0 and await deps.redis.xlen(consumer.stream) == 0
    receipts = await deps.redis.hgetall(deps.keys.receipts("A"))
    assert receipts == {b"fake:e1": b"e1", b"fake:e3": b"e3", b"fake:e6": b"e6"}, "receipts kept for aside ones too"


async def test_a_malformed_entry_is_dead_lettered_and_the_next_one_delivered(deps: Deps) -> None:
    delivered: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver, claim_idle_ms=0)
    await consumer.ensure_group()
    newer = message(1).model_dump() | {"kind": "hologram"}  # a kind from a newer version, mid rolling deploy
    await deps.redis.xadd(consumer.stream, {"m": json.dumps(newer)})
    await deps.redis.xadd(consumer.stream, {"m": b"{not json"})
    await deps.redis.xadd(consumer.stream, {"other": "field"})
    await put(deps, deps.keys, message(2))
    await pump_until(consumer, lambda: delivered == ["e2"], timeout=2.0)
    letters = await deps.bus.dead_letters()
    assert [f["payload"] for _, f in letters] == [json.dumps(newer), "{not json", ""]
    assert all(f["error"].startswith("malformed outbox entry: ") for _, f in letters)
    assert "kind" in letters[0][1]["error"] and "JSON" in letters[1][1]["error"]
    assert await deps.redis.xlen(consumer.stream) == 0
    assert (await deps.redis.xpending(consumer.stream, consumer.group))["pending"] == 0


async def test_delivery_outboxes_are_never_trimmed_but_the_broadcast_one_is_capped(deps: Deps) -> None:
    """Nothing undelivered is trimmed: 100,200 queued replies (Slack down for a day) are all still there."""
    n = 100_200
    repeat = "for i = 1, tonumber(ARGV[1]) do redis.call(unpack(ARGV, 2)) end"
    msg = message(1).model_copy(update={"ref": ChannelRef(kind="slack", address="C1")})
    await deps.redis.eval(repeat, 0, n, *outbox_command(deps.keys, msg))
    await deps.redis.eval(repeat, 0, n, *outbox_command(deps.keys, msg, "webhook.audit"))
    assert await deps.redis.xlen(deps.keys.outbox("slack")) == n
    assert await deps.redis.xlen(deps.keys.outbox("webhook.audit")) == n
    chat = msg.model_copy(update={"ref": ChannelRef(kind="terminal", address="s1")})
    await deps.redis.eval(repeat, 0, n, *outbox_command(deps.keys, chat))
    assert await deps.redis.xlen(deps.keys.outbox("terminal")) < n, "read by chat sessions, never deleted: capped"
    await deps.redis.delete(*(deps.keys.outbox(k) for k in ("slack", "webhook.audit", "terminal")))


async def test_an_outbox_whose_group_vanished_recreates_it_and_carries_on(deps: Deps) -> None:
    """Redis restarted empty: the group is gone (NOGROUP); the consumer re-creates it instead of failing."""
    delivered: list[str] = []

    async def deliver(msg: Outbound) -> Receipt:
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", deliver)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1))
    assert await consumer.run_once(block_ms=50) == 1
    await deps.redis.delete(consumer.stream)  # what a restart without persistence leaves: no stream, no group
    assert await consumer.run_once(block_ms=50) == 0
    await put(deps, deps.keys, message(2))
    await pump_until(consumer, lambda: delivered == ["e1", "e2"])
    await deps.redis.xgroup_destroy(consumer.stream, consumer.group)  # or the group alone
    await put(deps, deps.keys, message(3))
    await pump_until(consumer, lambda: delivered == ["e1", "e2", "e3"])


async def test_a_deliverer_cancelled_while_a_message_is_set_aside_loses_nothing(deps: Deps) -> None:
    """The lease holder dies (its task cancelled) with a message set aside and one queued behind it: the next
    holder delivers both, once each and in order."""
    failed: list[str] = []
    delivered: list[str] = []
    stop = asyncio.Event()

    async def failing(msg: Outbound) -> Receipt:
        failed.append(msg.id)
        raise Flaky(retry_after=0.3)

    async def working(msg: Outbound) -> Receipt:
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    first = OutboxConsumer(deps.redis, deps.keys, "fake", failing, consumer="deliverer", claim_idle_ms=0)
    task = asyncio.create_task(first.run_exclusive(stop, lease_ms=600))
    await put(deps, deps.keys, message(1, "A"))
    await eventually(lambda: bool(failed))
    await put(deps, deps.keys, message(2, "A"))

    async def both_aside() -> bool:
        return await first.waiting() == 2

    await eventually(both_aside)
    task.cancel()  # no clean shutdown: whatever the lease holder was doing is cut off
    await asyncio.gather(task, return_exceptions=True)

    second = OutboxConsumer(deps.redis, deps.keys, "fake", working, consumer="deliverer", claim_idle_ms=0)
    task = asyncio.create_task(second.run_exclusive(stop, lease_ms=600))
    try:
        await eventually(lambda: len(delivered) == 2)
        await asyncio.sleep(0.3)  # time for a second delivery, were there one
        assert delivered == ["e1", "e2"]
        assert await second.waiting() == 0 and await deps.bus.dead_letters() == []
    finally:
        stop.set()
        await task


async def test_a_message_taken_off_the_stream_and_not_yet_set_aside_is_not_lost(deps: Deps) -> None:
    """Cut off mid-delivery (before it could be set aside), the entry stays pending and is delivered next run."""
    delivered: list[str] = []
    hang = asyncio.Event()

    async def hanging(msg: Outbound) -> Receipt:
        await hang.wait()
        raise AssertionError("never answers")

    async def working(msg: Outbound) -> Receipt:
        delivered.append(msg.id)
        return Receipt(channel_id=msg.id)

    consumer = OutboxConsumer(deps.redis, deps.keys, "fake", hanging, claim_idle_ms=0)
    await consumer.ensure_group()
    await put(deps, deps.keys, message(1))
    with_timeout = asyncio.wait_for(consumer.run_once(block_ms=50), 0.3)
    try:
        await with_timeout
    except TimeoutError:
        pass
    consumer.deliver = working
    await pump_until(consumer, lambda: delivered == ["e1"])
    await consumer.run_once(block_ms=50)
    assert delivered == ["e1"]


def test_backoff_doubles_up_to_a_cap_and_a_retry_after_wins() -> None:
    assert [backoff(n, 0.5, None) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff(20, 0.5, None) == 60.0
    assert backoff(1, 0.5, 7) == 7.0
