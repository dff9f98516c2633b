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


def next_action(thread: Thread, agent: Agent) -> Action:
    events = thread.events
    if thread.status is not Status.RUNNING or not any(e.type in HUMAN_INPUT for e in events):
        return Wait()  # a launched thread waits for its first message
    decisions = {e.approval_id: e for e in events if isinstance(e, ApprovalDecided)}
    requests = {e.call_id: e for e in events if isinstance(e, ApprovalRequested)}
    done = {e.call_id for e in events if isinstance(e, ToolResult)}
    for e in events:
        if not isinstance(e, ToolCall) or e.call_id in done:
            continue
        if agent.gated(e.tool) is None:
            return RunTool(e, e.args, None)
        request = requests.get(e.call_id)
        decision = decisions.get(request.approval_id) if request else None
        if request is None or decision is None:
            continue  # cannot happen while running: the request is written with the call
        if decision.approved:
            return RunTool(e, decision.args if decision.args is not None else e.args, request.approval_id)
        # a rejected call is settled by its rejection; the agent re-plans with the feedback
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


def repeated_call(events: Sequence[Event], tool: str, args: dict[str, Any]) -> bool:
    """True when this exact call already ran since the last human input: the agent is going round in circles."""
    wanted = args_hash(tool, args)
    since = _since_human(events)
    ran = {e.call_id for e in since if isinstance(e, ToolResult)}
    return any(isinstance(e, ToolCall) and e.call_id in ran and args_hash(e.tool, e.args) == wanted for e in since)
