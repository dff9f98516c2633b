"""What a thread needs next, decided from its events alone (factor 8: the control flow is ours).

Pure functions: the worker asks ``next_action`` after every change and does what it says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.agent import Agent
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    Error,
    Event,
    ToolCall,
    ToolResult,
    ToolStarted,
    args_hash,
)
from bot.threads import Status, Thread

MAX_CONSECUTIVE_ERRORS = 3
PREFETCH_PREFIX = "prefetch-"
HUMAN_INPUT = frozenset({"message.received", "human.answered", "approval.decided", "thread.resumed"})
AGENT_STEPS = frozenset({"tool.call", "reply", "human.asked", "error"})


@dataclass(frozen=True)
class Wait:
    """Nothing to do until something arrives from outside."""


@dataclass(frozen=True)
class RunTool:
    call: ToolCall
    args: dict[str, Any]  # the arguments to run with (an approver may have edited them)
    approval_id: str | None  # the approval this run rests on, for a gated tool


@dataclass(frozen=True)
class Prefetch:
    """Run the agent's pre-fetch tools before its first model call."""


@dataclass(frozen=True)
class AskAgent:
    """Ask the agent for its next step."""


@dataclass(frozen=True)
class Escalate:
    """Stop looping and ask a human instead."""

    question: str


Action = Wait | RunTool | Prefetch | AskAgent | Escalate


@dataclass(frozen=True)
class Ungated:
    """The call was never sent for approval and its tool is not gated now: it may run."""


@dataclass(frozen=True)
class Approved:
    """The call runs on this approval (the executor still checks the approval record in Redis)."""

    approval_id: str


@dataclass(frozen=True)
class Refused:
    why: str


Gate = Ungated | Approved | Refused


def next_action(thread: Thread, agent: Agent) -> Action:
    events = thread.events
    if thread.status is not Status.RUNNING or not any(e.type in HUMAN_INPUT for e in events):
        return Wait()  # a launched thread waits for its first message
    requests = {e.call_id: e for e in events if isinstance(e, ApprovalRequested)}
    decisions = {e.approval_id: e for e in events if isinstance(e, ApprovalDecided)}
    done = {e.call_id for e in events if isinstance(e, ToolResult)}
    for e in events:
        if not isinstance(e, ToolCall) or e.call_id in done:
            continue
        request = requests.get(e.call_id)
        if request is None:
            return RunTool(e, e.args, None)  # never sent for approval; the executor's gate refuses it if gated now
        decision = decisions.get(request.approval_id)
        if decision is None:
            continue  # cannot happen while running: the thread waits for the decision
        if decision.approved:
            return RunTool(e, decision.args if decision.args is not None else e.args, request.approval_id)
        # a rejected call is settled by its rejection (recorded as its result since; older logs lack that result)
    if agent.prefetch and not any(_prefetched(e) for e in events):
        return Prefetch()
    since = _since_human(events)
    errors = _trailing_errors(since)
    if len(errors) >= MAX_CONSECUTIVE_ERRORS:
        return Escalate(
            f"I could not produce a valid next step {len(errors)} times in a row "
            f"(last error: {errors[-1].message}). How should I proceed?"
        )
    steps = sum(1 for e in since if e.type in AGENT_STEPS and not _prefetched(e))
    if steps >= agent.max_steps:
        return Escalate(f"I have taken {steps} steps without finishing. Should I go on, and how?")
    return AskAgent()


def _prefetched(e: Event) -> bool:
    return isinstance(e, ToolCall) and e.call_id.startswith(PREFETCH_PREFIX)


def _since_human(events: Sequence[Event]) -> Sequence[Event]:
    for i in range(len(events) - 1, -1, -1):
        if events[i].type in HUMAN_INPUT:
            return events[i + 1 :]
    return events


def _trailing_errors(events: Sequence[Event]) -> list[Error]:
    errors: list[Error] = []
    for e in reversed(events):
        if isinstance(e, Error):
            errors.append(e)
        elif e.type in AGENT_STEPS:
            break
    return list(reversed(errors))


def gate(events: Sequence[Event], agent: Agent, call: ToolCall, args: dict[str, Any]) -> Gate:
    """May ``call`` run with ``args``? Read from the log, not from today's config: a call that was sent for
    approval runs only on its approval of exactly these arguments, even if its tool is no longer gated; a call
    that was not, runs only if its tool is not gated now (else the agent must propose it again, to be asked)."""
    request = next((e for e in events if isinstance(e, ApprovalRequested) and e.call_id == call.call_id), None)
    if request is None:
        if agent.gated(call.tool) is not None:
            return Refused(f"{call.tool} needs approval and this call was never sent for it; propose it again")
        return Ungated()
    decision = next(
        (e for e in events if isinstance(e, ApprovalDecided) and e.approval_id == request.approval_id), None
    )
    if decision is None:
        return Refused("the call is still waiting for its approval")
    if not decision.approved:
        return Refused(f"rejected by {decision.by}")
    if decision.args_hash and decision.args_hash != args_hash(call.tool, args):
        return Refused("the approved call differs from this one")
    return Approved(request.approval_id)


def repeated_call(
    events: Sequence[Event], tool: str, args: dict[str, Any], *, repeatable: bool = False
) -> ToolCall | None:
    """The call of this thread that already ran with exactly this tool and these arguments, if any.

    "Ran" means it was handed to the tool (ToolStarted, hashed with the arguments it ran with, an approver's
    edit included), whether it succeeded or not: a failed run may have had effects, and a new call would carry a
    new idempotency key. Rejected and refused calls never ran. A ``repeatable`` tool may run again after a human
    has spoken; within one stretch of agent steps a repeat is the agent going round in circles either way.
    """
    wanted = args_hash(tool, args)
    scope = _since_human(events) if repeatable else events
    ran = {e.call_id for e in scope if isinstance(e, ToolStarted) and e.args_hash == wanted}
    return next((e for e in events if isinstance(e, ToolCall) and e.call_id in ran), None)
