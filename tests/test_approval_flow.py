"""The approval loop end to end through Redis, with the deterministic refund agent and in-process workers."""

from __future__ import annotations

import asyncio
from typing import Any

from bot import approvals, control, threads
from bot.events import ApprovalDecided, ChannelRef, MessageReceived, Reply, ToolCall, ToolResult, ToolStarted
from bot.loop import Runner, Tx
from bot.outbox import Outbound
from bot.plan import RunTool
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


async def ledger(deps: Deps) -> dict[bytes, bytes]:
    return dict(await deps.redis.hgetall(f"{deps.keys.ns}:refunds"))


async def outbox(deps: Deps, kind: str = "terminal") -> list[Outbound]:
    rows = await deps.redis.xrange(deps.keys.outbox(kind))
    return [Outbound.model_validate_json(f[b"m"]) for _, f in rows]


async def pending_refund(deps: Deps, text: str = "refund A100 25") -> tuple[str, str]:
    """Launch a refund and wait for its approval request; returns (thread id, approval id)."""
    accepted = await control.launch(deps, "refund-desk", text, ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    return accepted.thread_id, request.approval_id


async def test_approved_call_runs_once_and_the_agent_replies(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    assert await ledger(deps) == {}, "nothing runs before the approval"
    record = await approvals.get(deps.redis, deps.keys, approval_id)
    assert (record.tool, record.args, record.state) == (
        "issue_refund",
        {"order_id": "A100", "amount_cents": 2500},
        "pending",
    )

    outcome = await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    assert outcome.result == "ok"
    thread = await wait_for(deps, tid, status_is(Status.DONE))

    assert [e.type for e in thread.events] == [
        "thread.launched", "message.received",
        "tool.call", "tool.started", "tool.result",  # lookup_order
        "tool.call", "approval.requested", "approval.decided", "tool.started", "tool.result",  # issue_refund
        "reply",
    ]  # fmt: skip
    assert list((await ledger(deps)).values()) == [f"A100:2500:R-{approval_id[-6:]}".encode()]
    reply = thread.events[-1]
    assert isinstance(reply, Reply) and reply.text == f"Refunded $25.00 on order A100 (R-{approval_id[-6:]})."
    said = [(m.kind, m.text.splitlines()[0]) for m in await outbox(deps)]
    assert said == [
        ("approval_request", "Approval needed to run issue_refund:"),
        ("approval_update", "Approved by terminal:alice"),
        ("text", reply.text),
    ]
    assert (await approvals.get(deps.redis, deps.keys, approval_id)).state == "approved"
    assert await approvals.pending(deps.redis, deps.keys) == []


async def test_rejection_reaches_the_agent_which_replans(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    await control.decide(deps, approval_id, by="api:ops", approved=False, feedback="order already refunded")
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    reply = thread.events[-1]
    assert isinstance(reply, Reply)
    assert reply.text == "OK, I did not refund it. api:ops rejected the refund: order already refunded"
    assert not any(isinstance(e, ToolStarted) and e.call_id == approval_id for e in thread.events)
    assert await ledger(deps) == {}


async def test_approver_can_edit_the_arguments_and_the_edited_call_runs(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    outcome = await control.decide(
        deps, approval_id, by="terminal:alice", approved=True, args={"order_id": "A100", "amount_cents": 1000}
    )
    assert outcome.result == "ok"
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert [v.split(b":")[1] for v in (await ledger(deps)).values()] == [b"1000"]
    assert "Refunded $10.00" in thread.events[-1].text  # type: ignore[union-attr]


async def test_a_non_approver_is_refused_and_nothing_runs(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    outcome = await control.decide(deps, approval_id, by="terminal:mallory", approved=True)
    assert (outcome.result, outcome.message) == ("forbidden", "you are not allowed to decide this approval")
    # a forged decision put straight on the inbound stream is not applied either
    forged = ApprovalDecided(thread_id=tid, key="forged", approval_id=approval_id, approved=True, by="terminal:alice")
    assert await deps.bus.publish(forged)
    await asyncio.sleep(0.3)
    thread = await threads.load(deps.redis, deps.keys, tid)
    assert thread.status is Status.WAITING_APPROVAL
    assert not any(isinstance(e, ApprovalDecided) for e in thread.events)
    assert (await approvals.get(deps.redis, deps.keys, approval_id)).state == "pending"
    assert await ledger(deps) == {}


async def test_two_simultaneous_decisions_one_wins(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    results = await asyncio.gather(
        *(control.decide(deps, approval_id, by=who, approved=ok) for who, ok in
          [("terminal:alice", True), ("api:ops", False)] * 5)
    )  # fmt: skip
    winners = [r for r in results if r.result == "ok"]
    assert len(winners) == 1
    losers = [r for r in results if r.result != "ok"]
    assert {(r.result, r.by, r.state) for r in losers} == {("decided", winners[0].by, winners[0].state)}
    assert losers[0].message.startswith(f"already {winners[0].state} by {winners[0].by} at ")
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert sum(isinstance(e, ApprovalDecided) for e in thread.events) == 1
    assert len(await ledger(deps)) == (1 if winners[0].state == "approved" else 0)


async def test_a_repeated_inbound_event_is_ignored(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    again = MessageReceived(thread_id=tid, key="slack-event-Ev123", text="refund A101", ref=ALICE)
    assert await deps.bus.publish(again) is not None
    assert await deps.bus.publish(again) is None, "a repeat is recognised at the door"
    # a repeat that got past the door (say, after the de-duplication window) is dropped by the worker
    assert await deps.bus.publish(again, dedupe=False) is not None
    await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL, Status.DONE))
    await asyncio.sleep(0.2)
    thread = await threads.load(deps.redis, deps.keys, tid)
    assert sum(e.key == "slack-event-Ev123" for e in thread.events) == 1


async def test_the_executor_refuses_a_gated_call_without_a_matching_approval(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    thread = await threads.load(deps.redis, deps.keys, tid)
    call = thread.call(approval_id)
    assert call is not None
    agent = deps.agents.agent("refund-desk")
    committed: list[Any] = []

    async def commit(log: str, last_id: str, cmds: Any) -> list[Any]:
        committed.append(cmds)
        return [b"1-0"] * len(cmds)

    runner = Runner(deps, deps.keys)
    # no approval at all, the request still pending, and an approved record bound to other arguments
    attempts = [RunTool(call, call.args, None), RunTool(call, call.args, approval_id)]
    for action in attempts:
        tx = Tx(threads.Thread(tid, list(thread.events)), deps.keys, commit)
        await runner.run_tool(tx, agent, action)
        result = tx.fresh[-1]
        assert isinstance(result, ToolResult) and not result.ok and "refusing to run issue_refund" in result.error
    await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    done = await wait_for(deps, tid, status_is(Status.DONE))
    # the log as it stood when the decision came in, asked to run other arguments: the log's decision refuses it,
    # and so does the approval record when the logged decision carries no hash (as an old or forged one might)
    upto = next(i for i, e in enumerate(done.events) if isinstance(e, ApprovalDecided))
    decision = done.events[upto]
    assert isinstance(decision, ApprovalDecided)
    for logged in (decision, decision.model_copy(update={"args_hash": ""})):
        tx = Tx(threads.Thread(tid, [*done.events[:upto], logged]), deps.keys, commit)
        await runner.run_tool(tx, agent, RunTool(call, {"order_id": "A100", "amount_cents": 12900}, approval_id))
        result = tx.fresh[-1]
        assert isinstance(result, ToolResult) and "the approved call differs" in result.error
    assert len(await ledger(deps)) == 1, "only the approved run happened"


async def test_pause_holds_a_decision_until_resume_and_cancel_stops_for_good(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, approval_id = await pending_refund(deps)
    await control.pause(deps, tid, "terminal:alice")
    await wait_for(deps, tid, status_is(Status.PAUSED))
    await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    await asyncio.sleep(0.3)
    assert await ledger(deps) == {}, "a paused thread runs nothing"
    await control.resume(deps, tid, "terminal:alice")
    await wait_for(deps, tid, status_is(Status.DONE))
    assert len(await ledger(deps)) == 1

    await control.send(deps, tid, "refund A102", ALICE)
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    await control.cancel(deps, tid, "terminal:alice", reason="wrong customer")
    thread = await wait_for(deps, tid, status_is(Status.CANCELLED))
    late = thread.open_approval()
    assert late is not None
    outcome = await control.decide(deps, late.approval_id, by="terminal:alice", approved=True)
    assert outcome.result == "decided" and outcome.message.startswith("already cancelled at ")
    assert await approvals.pending(deps.redis, deps.keys) == []
    await control.send(deps, tid, "refund A101", ALICE)
    await asyncio.sleep(0.3)
    thread = await threads.load(deps.redis, deps.keys, tid)
    assert thread.status is Status.CANCELLED and thread.events[-1].type == "thread.cancelled"


async def test_threads_proceed_in_parallel_on_two_workers(deps: Deps, start_worker: Any) -> None:
    first, second = await start_worker(), await start_worker()
    for _ in range(50):
        if len(first.owned) == len(second.owned) == deps.keys.partitions // 2:
            break
        await asyncio.sleep(0.1)
    assert set(first.owned).isdisjoint(second.owned)
    assert len(first.owned) + len(second.owned) == deps.keys.partitions
    launched = [await control.launch(deps, "refund-desk", f"refund A10{i % 3}", ALICE) for i in range(12)]
    for a in launched:
        await wait_for(deps, a.thread_id, status_is(Status.WAITING_APPROVAL))
    assert first.processed > 0 and second.processed > 0
    assert any(
        isinstance(e, ToolCall) for e in (await threads.load(deps.redis, deps.keys, launched[0].thread_id)).events
    )
