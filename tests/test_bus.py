"""The inbound bus: fenced writes, undecodable entries, and the dead-letter stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot import control, threads
from bot.errors import LeaseLost, LogConflict
from bot.events import ChannelRef
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


async def test_a_write_with_a_stale_fencing_token_changes_nothing(deps: Deps) -> None:
    lease = deps.keys.lease(0)
    await deps.redis.set(lease, "worker-b:7")
    with pytest.raises(LeaseLost):
        await deps.bus.fenced(lease, "worker-a:6", [("SET", f"{deps.keys.ns}:x", "1")])
    assert await deps.redis.get(f"{deps.keys.ns}:x") is None
    assert await deps.bus.fenced(
        lease, "worker-b:7", [("SET", f"{deps.keys.ns}:x", "1"), ("GET", f"{deps.keys.ns}:x")]
    ) == [b"OK", b"1"]


async def test_an_undecodable_entry_is_dead_lettered_and_the_partition_goes_on(deps: Deps, start_worker: Any) -> None:
    accepted_first = await control.launch(deps, "refund-desk", "hello", ALICE)
    stream = deps.keys.inbound_for(accepted_first.thread_id)
    await deps.redis.xadd(stream, {"e": b"\x00garbage"})
    accepted = await control.launch(deps, "refund-desk", "refund A100", ALICE, thread_id=accepted_first.thread_id + "x")
    await start_worker()
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    await wait_for(deps, accepted_first.thread_id, status_is(Status.DONE))
    letters = await deps.bus.dead_letters()
    assert [f["error"] for _, f in letters if f["stream"] == stream] == [
        "undecodable entry: unknown event encoding b'\\x00'"
    ]


async def test_an_event_that_keeps_failing_goes_to_the_dead_letter_stream_and_can_be_retried(
    deps: Deps, start_worker: Any
) -> None:
    from tests import slow_agent

    slow_agent.FAIL["on"] = True
    try:
        await start_worker()
        accepted = await control.launch(deps, "flaky", "hi", ALICE)
        for _ in range(200):
            letters = await deps.bus.dead_letters()
            if letters:
                break
            await asyncio.sleep(0.05)
        [(dlq_id, fields)] = letters
        assert fields["error"] == "RuntimeError: the flaky agent is failing on purpose"
        # the launch went through; the message that failed three times is parked, not lost, not retried forever
        thread = await threads.load(deps.redis, deps.keys, accepted.thread_id)
        assert [e.type for e in thread.events] == ["thread.launched"]
        assert await deps.redis.xlen(deps.keys.inbound_for(accepted.thread_id)) == 0  # acknowledged: deleted
    finally:
        slow_agent.FAIL["on"] = False
    await deps.bus.retry_dead_letter(dlq_id)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE))
    assert thread.events[-1].text == "fine now"  # type: ignore[union-attr]
    assert await deps.bus.dead_letters() == []


async def test_a_commit_retried_after_it_was_applied_is_refused(deps: Deps) -> None:
    """The client retries a command whose reply was lost; the log's last id shows it already went through."""
    lease, log = deps.keys.lease(1), deps.keys.log("t-retry")
    await deps.redis.set(lease, "w:1")
    cmds = [("XADD", log, "*", "e", b"j{}")]
    [first_id] = await deps.bus.fenced(lease, "w:1", cmds, log=log, last_id="0-0")
    with pytest.raises(LogConflict, match=f"log ends at {first_id.decode()}, not 0-0"):
        await deps.bus.fenced(lease, "w:1", cmds, log=log, last_id="0-0")
    assert await deps.redis.xlen(log) == 1
    assert await deps.bus.fenced(lease, "w:1", cmds, log=log, last_id=first_id.decode())


async def test_events_of_one_thread_are_published_together_all_or_none(deps: Deps) -> None:
    from bot.events import MessageReceived, ThreadLaunched

    launched = ThreadLaunched(thread_id="t-pub", key="launch:t-pub", agent="refund-desk", ref=ALICE)
    first = MessageReceived(thread_id="t-pub", key="m1", text="hi")
    second = MessageReceived(thread_id="t-pub", key="m2", text="again")
    ids = await deps.bus.publish_all([launched, first])
    assert ids and all(ids)
    assert await deps.bus.publish_all([launched, second]) is None, "one seen key makes the whole call a repeat"
    assert await deps.bus.publish_all([second]), "and the repeat published nothing, not even its new event"
    rows = await deps.redis.xrange(deps.keys.inbound_for("t-pub"))
    assert [r[0].decode() for r in rows][:2] == ids and len(rows) == 3
    with pytest.raises(ValueError, match="exactly one thread"):
        await deps.bus.publish_all([first, MessageReceived(thread_id="other", key="m3", text="x")])


async def test_dead_lettering_an_entry_twice_writes_one_dead_letter(deps: Deps) -> None:
    """redis-py re-sends a call whose reply was lost: the entry moves to the dead-letter stream once."""
    from bot.worker import Worker

    worker, stream = Worker(deps), deps.keys.inbound(0)
    await deps.redis.set(deps.keys.lease(0), "w:1")
    entry = await deps.redis.xadd(stream, {"e": b"x"})
    for _ in range(2):
        await worker._dead_letter(0, "w:1", stream, entry, {b"e": b"x"}, "RuntimeError: boom")
    assert [f["error"] for _, f in await deps.bus.dead_letters()] == ["RuntimeError: boom"]
    assert await deps.redis.xlen(stream) == 0
    with pytest.raises(LeaseLost):  # and only the partition's owner can do it
        await worker._dead_letter(0, "w:0", stream, entry, {b"e": b"x"}, "late")
