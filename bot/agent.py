"""Agents: a step function from a thread's events to the next step, plus tools, approvals and limits."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from bot.events import Event, LLMInfo
from bot.tools import Tool


@dataclass(frozen=True)
class CallTool:
    tool: str
    args: dict[str, Any]
    reason: str = ""
    # Ask only these of the approvers the tool's policy allows (none: all of the policy's); for a step that
    # relays a request naming who may approve it (the MCP channel's request_approval)
    approvers: tuple[str, ...] = ()
    kind: Literal["call_tool"] = "call_tool"


@dataclass(frozen=True)
class SendReply:
    text: str
    kind: Literal["reply"] = "reply"


@dataclass(frozen=True)
class AskHuman:
    question: str
    kind: Literal["ask_human"] = "ask_human"


@dataclass(frozen=True)
class Malformed:
    """The step produced something unusable (bad JSON, unknown tool...): recorded as an error, retried."""

    error_kind: str
    message: str
    kind: Literal["malformed"] = "malformed"


Step = CallTool | SendReply | AskHuman


@dataclass(frozen=True)
class StepOutcome:
    step: Step | Malformed
    llm: LLMInfo | None = None


# The agent step (factor 12): the thread's events in, the next step out. Nothing else is read or written.
StepFn = Callable[[Sequence[Event]], Awaitable[StepOutcome]]


DEFAULT_EXPIRY = 7 * 24 * 3600.0  # seconds: a request nobody decides within a week expires


@dataclass(frozen=True)
class ApprovalPolicy:
    approvers: tuple[str, ...]
    expires_after: float = DEFAULT_EXPIRY  # seconds a request may wait for a decision before it expires

    def allows(self, identity: str) -> bool:
        """Approvers are exact identities (``slack:U123``) or a whole channel kind (``terminal:*``)."""
        kind = identity.split(":", 1)[0]
        return identity in self.approvers or f"{kind}:*" in self.approvers

    def narrowed(self, wanted: Sequence[str]) -> tuple[str, ...]:
        """The approvers to ask when a step names some: those this policy allows. Never anyone the policy does
        not allow; when none of them is allowed (the caller should have refused that), all of the policy's."""
        allowed = tuple(a for a in wanted if self.allows(a))
        return allowed or self.approvers


@dataclass(frozen=True)
class Prefetch:
    tool: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outage:
    """How long to keep retrying a model that cannot be reached, and when to tell the thread's humans."""

    retry_first: float = 5.0  # seconds before the first retry; the wait doubles with each failed try
    retry_max: float = 300.0  # the longest wait between tries
    notify_after: float = 60.0  # once the model has been away this long, the thread's humans are told


@dataclass(frozen=True)
class Agent:
    name: str
    step: StepFn
    tools: dict[str, Tool]
    approvals: dict[str, ApprovalPolicy]  # tool name -> who may approve; a tool listed here is gated
    max_steps: int = 12
    prefetch: tuple[Prefetch, ...] = ()
    description: str = ""
    step_timeout: float = 120.0  # seconds for one model call (or one deterministic step)
    tool_timeout: float = 60.0  # seconds for one tool call, unless tool_timeouts names the tool
    tool_timeouts: dict[str, float] = field(default_factory=dict)
    outage: Outage = Outage()
    prepare: Callable[[], Awaitable[None]] | None = None  # called before each turn (lists MCP servers' tools)

    def gated(self, tool: str) -> ApprovalPolicy | None:
        """The policy for ``tool``: by its name, else by the first pattern that matches it (``github.*``)."""
        policy = self.approvals.get(tool)
        if policy is None:
            policy = next((p for name, p in self.approvals.items() if "*" in name and fnmatchcase(tool, name)), None)
        return policy

    def timeout_for(self, tool: str) -> float:
        return self.tool_timeouts.get(tool, self.tool_timeout)


def deterministic(fn: Callable[[Sequence[Event]], Step | Awaitable[Step]]) -> StepFn:
    """Wrap a plain-Python step (no model at all; a plain or an async function) as an agent step."""

    async def step(events: Sequence[Event]) -> StepOutcome:
        out = fn(events)
        return StepOutcome(await out if inspect.isawaitable(out) else out)

    step.instant = not inspect.iscoroutinefunction(fn)  # type: ignore[attr-defined]  # plain code: never waits
    return step
