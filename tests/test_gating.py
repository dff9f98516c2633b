"""Nothing gated runs without its yes, and nothing runs twice: repeats across a thread, gating read from the log,
a cancel racing a decision, and decisions that no longer fit the config. Real Redis, in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from bot import approvals, codec, control, threads
from bot.errors import Conflict
from bot.events import ApprovalDecided, ApprovalRequested, ChannelRef, Error, Reply, ToolResult
from bot.outbox import Outbound
from bot.runtime import Deps
from bot.threads import Status, Thread
from bot.worker import Worker
from tests.conftest import status_is, wait_for, web_client
from tests.scripted_model import ScriptedModel, call

BOB = ChannelRef(kind="terminal", address="t", user="terminal:bob")


async def ledger(deps: Deps) -> dict[bytes, bytes]:
    return dict(await deps.redis.hgetall(f"{deps.keys.ns}:refunds"))


async def said(deps: Deps) -> list[Outbound]:
    return [Outbound.model_validate_json(f[b"m"]) for _, f in await deps.redis.xrange(deps.keys.outbox("terminal"))]


@contextlib.asynccontextmanager
async def worker_for_a_while(deps: Deps) -> AsyncIterator[Worker]:
    """A worker that stops (and releases its partitions) at the end of the block, before the test ends."""
    stop = asyncio.Event()
    worker = Worker(deps)
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(100):
            if worker.owned:
                break
            await asyncio.sleep(0.02)
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def waiting_refund(deps: Deps, text: str = "refund A100 25") -> tuple[str, ApprovalRequested]:
    accepted = await control.launch(deps, "refund-desk", text, BOB)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    return accepted.thread_id, request


def ungate(deps: Deps, name: str = "refund-desk", *, drop_tool: str = "") -> None:
    """The operator edits the config: the agent's approval policies are gone (and maybe a tool with them)."""
    agent = deps.agents.agents[name]
    tools = {n: t for n, t in agent.tools.items() if n != drop_tool}
    deps.agents.agents[name] = replace(agent, approvals={}, tools=tools)


def replies(thread: Thread) -> int:
    return sum(isinstance(e, Reply) for e in thread.events)


async def test_a_model_repeating_an_approved_call_is_told_it_ran_and_no_second_card_goes_out(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    refund = {"order_id": "A102", "amount_cents": 5000}
    model.add(call("issue_refund", refund), call("issue_refund", refund), call("reply", {"text": "Done."}))
    await start_worker()
    accepted = await control.launch(deps, "support", "please refund $50 of order A102", BOB)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=30)
    request = thread.open_approval()
    assert request is not None
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=10)

    assert [e.type for e in thread.events if e.type != "tool.started"][-6:] == [
        "tool.call", "approval.requested", "approval.decided", "tool.result", "error", "reply"
    ]  # fmt: skip
    [error] = [e for e in thread.events if isinstance(e, Error)]
    assert error.kind == "repeated_call"
    assert error.message.startswith(f"issue_refund already ran with these arguments (call {request.call_id});")
    assert "<error>\nkind: repeated_call" in str(model.requests[2]["messages"][1]["content"])
    assert sum(isinstance(e, ApprovalRequested) for e in thread.events) == 1
    assert [m.kind for m in await said(deps)].count("approval_request") == 1
    assert len(await ledger(deps)) == 1, "the refund ran once"


async def test_rejected_calls_never_run_after_the_tool_is_ungated(deps: Deps, start_worker: Any) -> None:
    """One thread as logged today (the rejection is the call's result), one as logged before (no result)."""
    async with worker_for_a_while(deps):
        rejected: list[tuple[str, str]] = []  # (thread, call)
        for feedback in ("fraud", "already refunded"):
            tid, request = await waiting_refund(deps)
            await control.decide(deps, request.approval_id, by="api:ops", approved=False, feedback=feedback)
            thread = await wait_for(deps, tid, status_is(Status.DONE))
            decided = next(i for i, e in enumerate(thread.events) if isinstance(e, ApprovalDecided))
            result = thread.events[decided + 1]
            assert isinstance(result, ToolResult) and result.call_id == request.call_id
            assert (result.ok, result.error) == (False, f"rejected by api:ops: {feedback}")
            reply = thread.events[-1]
            assert isinstance(reply, Reply)
            assert reply.text == f"OK, I did not refund it. api:ops rejected the refund: {feedback}"
            rejected.append((tid, request.call_id))
    old, old_call = rejected[1]  # make it an old log: drop the rejection's result
    rows = await deps.redis.xrange(deps.keys.log(old))
    [entry] = [i for i, f in rows if isinstance(e := codec.decode(f[b"e"], old), ToolResult) and e.call_id == old_call]
    await deps.redis.xdel(deps.keys.log(old), entry)

    ungate(deps)
    await start_worker()
    for tid, call_id in rejected:
        await control.send(deps, tid, "hello again", BOB)
        thread = await wait_for(deps, tid, lambda t: t.status is Status.DONE and replies(t) == 2)
        assert thread.started(call_id) is None
    assert await ledger(deps) == {}


async def test_a_decision_queued_behind_a_cancel_keeps_its_record_and_the_humans_are_told(
    deps: Deps, start_worker: Any
) -> None:
    async with worker_for_a_while(deps):
        tid, request = await waiting_refund(deps)
    # no worker now: the cancel is queued, then alice approves (recorded at once; its event queues behind)
    await control.cancel(deps, tid, "terminal:bob", reason="wrong customer")
    outcome = await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    assert (outcome.result, outcome.state) == ("ok", "approved")

    await start_worker()
    thread = await wait_for(deps, tid, status_is(Status.CANCELLED))
    for _ in range(200):  # until the queued decision has been applied (and ignored) too
        if await deps.redis.xlen(deps.keys.inbound_for(tid)) == 0:
            break
        await asyncio.sleep(0.02)
    thread = await threads.load(deps.redis, deps.keys, tid)
    record = await approvals.get(deps.redis, deps.keys, request.approval_id)
    assert (record.state, record.by) == ("approved", "terminal:alice"), "the record says what alice was told"
    truth = "Approved by terminal:alice, but the thread was cancelled first; nothing ran."
    assert [e.type for e in thread.events[-2:]] == ["thread.cancelled", "tool.result"]
    assert thread.events[-1].error == truth  # type: ignore[union-attr]
    assert thread.started(request.call_id) is None
    assert not any(isinstance(e, ApprovalDecided) for e in thread.events), "the late decision was not applied"
    assert [(m.kind, m.text) for m in await said(deps)][-2:] == [
        ("text", "Cancelled by terminal:bob."), ("approval_update", truth)
    ]  # fmt: skip
    assert await ledger(deps) == {}
    assert await approvals.pending(deps.redis, deps.keys) == []


async def test_a_plain_cancel_still_closes_the_approval_for_late_deciders(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, request = await waiting_refund(deps)
    await control.cancel(deps, tid, "terminal:bob")
    await wait_for(deps, tid, status_is(Status.CANCELLED))
    outcome = await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    assert outcome.result == "decided" and outcome.message.startswith("already cancelled at ")
    assert (await approvals.get(deps.redis, deps.keys, request.approval_id)).state == "cancelled"
    assert [m.text for m in await said(deps)][-1] == "Cancelled by terminal:bob."


async def test_an_edit_for_a_tool_removed_from_the_config_is_refused_and_changes_nothing(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start_worker()
    tid, request = await waiting_refund(deps)
    ungate(deps, drop_tool="issue_refund")
    edit = {"order_id": "A100", "amount_cents": 1000}
    with pytest.raises(Conflict, match="agent 'refund-desk' no longer has that tool in its configuration"):
        await control.decide(deps, request.approval_id, by="terminal:alice", approved=True, args=edit)
    monkeypatch.setenv("TEST_API_KEY_OPS", "sk-ops-0123456789")
    async with web_client(deps) as api:
        r = await api.post(f"/api/v1/approvals/{request.approval_id}/decision", json={"approved": True, "args": edit},
                           headers={"Authorization": "Bearer sk-ops-0123456789"})  # fmt: skip
    assert r.status_code == 409 and "no longer has that tool" in r.json()["detail"]
    assert (await approvals.get(deps.redis, deps.keys, request.approval_id)).state == "pending"
    assert (await threads.load(deps.redis, deps.keys, tid)).status is Status.WAITING_APPROVAL

    # approved as it was requested, the call cannot run either: the executor says so instead of failing
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    result = thread.result(request.call_id)
    assert result is not None and result.error == "issue_refund is no longer one of this agent's tools; nothing ran"
    assert await ledger(deps) == {} and await deps.bus.dead_letters() == []
