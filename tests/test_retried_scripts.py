"""redis-py retries a command whose reply was lost; the scripts that publish and decide answer such a retry as the
first run did, and a call with one repeated event publishes none of its events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bot import approvals, codec, control
from bot.events import ApprovalRequested, ChannelRef, MessageReceived, args_hash
from bot.runtime import Deps

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")
Script = Callable[..., Awaitable[Any]]


def reply_lost_once(script: Script) -> Script:
    """Run the script, lose its reply, and run it again with the same keys and arguments, as the retry does."""

    async def twice(**kwargs: Any) -> Any:
        await script(**kwargs)
        return await script(**kwargs)

    return twice


async def _stream(deps: Deps, thread_id: str) -> list[tuple[str, str]]:
    rows = await deps.redis.xrange(deps.keys.inbound_for(thread_id))
    return [(i.decode(), codec.decode(f[b"e"]).type) for i, f in rows]


async def test_a_publish_retried_after_a_lost_reply_answers_its_entry_not_duplicate(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deps.bus, "_publish", reply_lost_once(deps.bus._publish))
    entry = await deps.bus.publish(MessageReceived(thread_id="t1", key="m1", text="hi"))
    assert await _stream(deps, "t1") == [(entry, "message.received")]
    again = await deps.bus.publish(MessageReceived(thread_id="t1", key="m1", text="hi"))
    assert again is None, "a second call with the same key is still a repeat"


async def test_a_launch_retried_after_a_lost_reply_is_accepted_once(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deps.bus, "_publish", reply_lost_once(deps.bus._publish))
    accepted = await control.launch(deps, "refund-desk", "refund A101", ALICE, thread_id="t2", key="mail-1")
    assert not accepted.duplicate
    rows = await _stream(deps, "t2")
    assert [t for _, t in rows] == ["thread.launched", "message.received"] and rows[1][0] == accepted.entry


async def test_a_launch_whose_message_was_seen_publishes_nothing_not_an_orphan_thread(deps: Deps) -> None:
    await deps.bus.publish(MessageReceived(thread_id="t3", key="mail-2", text="hi"))
    accepted = await control.launch(deps, "refund-desk", "hi", ALICE, thread_id="t3-new", key="mail-2")
    assert accepted.duplicate
    assert await _stream(deps, "t3-new") == [], "no launch without its message"


async def _approval(deps: Deps, approvers: list[str]) -> str:
    args = {"order_id": "A101", "amount": 10}
    req = ApprovalRequested(thread_id="t4", key="req", approval_id="ap-1", call_id="c1", tool="issue_refund",
                            args=args, args_hash=args_hash("issue_refund", args), approvers=approvers)  # fmt: skip
    pipe = deps.redis.pipeline(transaction=True)
    for cmd in approvals.request_commands(deps.keys, req):
        pipe.execute_command(*cmd)
    await pipe.execute()
    return req.approval_id


async def test_a_decision_retried_after_a_lost_reply_tells_the_decider_ok_and_decides_once(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    approval_id = await _approval(deps, ["terminal:alice", "terminal:bob"])
    script = deps.redis.register_script(approvals._DECIDE)
    monkeypatch.setitem(approvals._scripts, deps.redis, reply_lost_once(script))
    outcome = await approvals.decide(deps.redis, deps.keys, approval_id, by="terminal:alice", approved=True)
    assert (outcome.result, outcome.state, outcome.by) == ("ok", "approved", "terminal:alice")
    assert [t for _, t in await _stream(deps, "t4")] == ["approval.decided"]
    monkeypatch.setitem(approvals._scripts, deps.redis, script)
    late = await approvals.decide(deps.redis, deps.keys, approval_id, by="terminal:bob", approved=False)
    assert (late.result, late.state, late.by) == ("decided", "approved", "terminal:alice"), "first decision wins"


async def test_a_second_launch_of_one_thread_with_a_new_message_continues_it(deps: Deps) -> None:
    first = await control.launch(deps, "refund-desk", "hi", ALICE, thread_id="t5", key="m-1")
    second = await control.launch(deps, "refund-desk", "again", ALICE, thread_id="t5", key="m-2")
    assert not first.duplicate and not second.duplicate
    assert [t for _, t in await _stream(deps, "t5")] == ["thread.launched", "message.received", "message.received"]
    assert (await control.launch(deps, "refund-desk", "again", ALICE, thread_id="t5", key="m-2")).duplicate
