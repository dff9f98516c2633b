"""The pure decisions of bot/plan.py, on hand-built logs: gating from the log, and repeats across the thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from agents.refunds import issue_refund, lookup_order
from bot.agent import Agent, ApprovalPolicy, SendReply, StepOutcome
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    ChannelRef,
    Event,
    MessageReceived,
    ThreadLaunched,
    ToolCall,
    ToolResult,
    ToolStarted,
    args_hash,
)
from bot.plan import Approved, AskAgent, Refused, RunTool, Ungated, Wait, gate, next_action, repeated_call
from bot.threads import Thread

T = "t1"
REFUND = {"order_id": "A100", "amount_cents": 12900}
HALF = {"order_id": "A100", "amount_cents": 6450}


async def _never(events: Sequence[Event]) -> StepOutcome:
    return StepOutcome(SendReply("unused"))


GATED = Agent(
    name="desk",
    step=_never,
    tools={"issue_refund": issue_refund, "lookup_order": lookup_order},
    approvals={"issue_refund": ApprovalPolicy(("terminal:alice",))},
)
UNGATED = replace(GATED, approvals={})  # the same agent after its approval policy was removed from the config


def opening(text: str = "refund A100") -> list[Event]:
    ref = ChannelRef(kind="terminal", address="t", user="terminal:bob")
    return [ThreadLaunched(thread_id=T, agent="desk", ref=ref), MessageReceived(thread_id=T, text=text, user="bob")]


def proposed(call_id: str, args: dict[str, Any], tool: str = "issue_refund") -> list[Event]:
    """A gated call as the loop records it: the call and its approval request, in one commit."""
    return [
        ToolCall(thread_id=T, call_id=call_id, tool=tool, args=args),
        ApprovalRequested(thread_id=T, approval_id=call_id, call_id=call_id, tool=tool, args=args,
                          args_hash=args_hash(tool, args), approvers=["terminal:alice"]),
    ]  # fmt: skip


def decided(call_id: str, approved: bool, edited: dict[str, Any] | None = None, args: dict[str, Any] = REFUND) -> Event:
    run = edited if edited is not None else args
    return ApprovalDecided(thread_id=T, approval_id=call_id, approved=approved, by="terminal:alice",
                           feedback="" if approved else "fraud", args=edited,
                           args_hash=args_hash("issue_refund", run) if approved else "")  # fmt: skip


def ran(call_id: str, args: dict[str, Any], tool: str = "issue_refund", ok: bool = True) -> list[Event]:
    return [
        ToolStarted(thread_id=T, call_id=call_id, args_hash=args_hash(tool, args)),
        ToolResult(thread_id=T, call_id=call_id, ok=ok, result={"done": True} if ok else None,
                   error="" if ok else "TimeoutError: the bank did not answer"),
    ]  # fmt: skip


# -- gating from the log ------------------------------------------------------------------------------------------


def test_an_old_rejection_without_a_result_never_runs_after_the_tool_is_ungated() -> None:
    """Logs written before rejections were recorded as results: the rejection alone settles the call."""
    events = [*opening(), *proposed("c1", REFUND), decided("c1", approved=False),
              MessageReceived(thread_id=T, text="hello again", user="bob")]  # fmt: skip
    for agent in (GATED, UNGATED):
        assert next_action(Thread(T, events), agent) == AskAgent()
        assert isinstance(gate(events, agent, events[2], REFUND), Refused)  # type: ignore[arg-type]


def test_an_approved_call_runs_on_its_approval_whatever_the_config_says_now() -> None:
    events = [*opening(), *proposed("c1", REFUND), decided("c1", approved=True, edited=HALF)]
    call = events[2]
    assert isinstance(call, ToolCall)
    for agent in (GATED, UNGATED):
        assert next_action(Thread(T, events), agent) == RunTool(call, HALF, "c1")
        assert gate(events, agent, call, HALF) == Approved("c1")
        refused = gate(events, agent, call, REFUND)  # the arguments as proposed, not as approved
        assert isinstance(refused, Refused) and "differs" in refused.why


def test_a_call_waiting_for_its_approval_is_refused_by_the_gate() -> None:
    events = [*opening(), *proposed("c1", REFUND)]
    assert next_action(Thread(T, events), UNGATED) == Wait()
    refused = gate(events, UNGATED, events[2], REFUND)  # type: ignore[arg-type]
    assert isinstance(refused, Refused) and "waiting for its approval" in refused.why


def test_a_call_never_sent_for_approval_is_refused_when_its_tool_is_gated_now() -> None:
    """Proposed while the tool was free (or before a crash); now gated: it does not run without a yes."""
    call = ToolCall(thread_id=T, call_id="c1", tool="issue_refund", args=REFUND)
    events = [*opening(), call]
    assert gate(events, UNGATED, call, REFUND) == Ungated()
    refused = gate(events, GATED, call, REFUND)
    assert isinstance(refused, Refused) and "propose it again" in refused.why


# -- repeats ------------------------------------------------------------------------------------------------------


def test_a_call_that_ran_before_a_human_spoke_is_still_a_repeat() -> None:
    events = [*opening(), *proposed("c1", REFUND), decided("c1", approved=True), *ran("c1", REFUND),
              MessageReceived(thread_id=T, text="thanks", user="bob")]  # fmt: skip
    first = repeated_call(events, "issue_refund", dict(REFUND))
    assert first is not None and first.call_id == "c1"
    assert repeated_call(events, "issue_refund", HALF) is None
    assert repeated_call(events, "lookup_order", {"order_id": "A100"}) is None


def test_a_repeat_is_judged_by_the_arguments_the_call_ran_with() -> None:
    events = [*opening(), *proposed("c1", REFUND), decided("c1", approved=True, edited=HALF), *ran("c1", HALF)]
    assert repeated_call(events, "issue_refund", HALF) is not None
    assert repeated_call(events, "issue_refund", REFUND) is None, "the proposed amount never ran"


def test_a_failed_run_counts_but_a_rejected_or_refused_call_does_not() -> None:
    events = [*opening(), *proposed("c1", REFUND), decided("c1", approved=True), *ran("c1", REFUND, ok=False),
              *proposed("c2", HALF), decided("c2", approved=False),
              ToolResult(thread_id=T, call_id="c2", ok=False, error="rejected by terminal:alice: fraud")]  # fmt: skip
    assert repeated_call(events, "issue_refund", REFUND) is not None, "it may have had effects"
    assert repeated_call(events, "issue_refund", HALF) is None, "a rejected call never ran"


def test_a_repeatable_tool_may_run_again_after_a_human_speaks_but_not_in_a_loop() -> None:
    looked = [ToolCall(thread_id=T, call_id="c1", tool="lookup_order", args={"order_id": "A100"}),
              *ran("c1", {"order_id": "A100"}, tool="lookup_order")]  # fmt: skip
    events = [*opening(), *looked]
    assert repeated_call(events, "lookup_order", {"order_id": "A100"}, repeatable=True) is not None
    events.append(MessageReceived(thread_id=T, text="and now?", user="bob"))
    assert repeated_call(events, "lookup_order", {"order_id": "A100"}, repeatable=True) is None
    assert repeated_call(events, "lookup_order", {"order_id": "A100"}) is not None
