"""The one event model: everything that happens to a thread is one of these, discriminated on ``type``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


def new_id() -> str:
    """A short, time-ordered, unique id (ms timestamp + 40 random bits, base36)."""
    return _b36(int(time.time() * 1000)) + _b36(int.from_bytes(os.urandom(5), "big")).rjust(8, "0")


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def now_ms() -> int:
    return int(time.time() * 1000)


def args_hash(tool: str, args: dict[str, Any]) -> str:
    """What an approval is bound to: the tool name and a canonical hash of its arguments."""
    canonical = json.dumps([tool, args], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class ChannelRef(BaseModel):
    """Where a conversation lives; replies go back here. ``kind`` names the channel adapter."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: str
    address: str = ""  # channel-specific: a terminal session, a Slack channel, an email address...
    user: str = ""  # who spoke, as the channel knows them


class LLMInfo(BaseModel):
    """What one model call cost and said, recorded on the event the step produced."""

    model: str
    raw: str  # the model's answer, verbatim (tool calls as JSON)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    prompt_sha: str = ""  # hash of the exact request sent (messages + tools)
    prompt_upto: int = 0  # the request is the render of the first N events of the log
    template_sha: str = ""  # the prompt template it was rendered with


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=new_id)
    thread_id: str
    at: int = Field(default_factory=now_ms)
    key: str = ""  # idempotency key; inbound events always carry one
    ref: ChannelRef | None = None  # where it came from (None: same as the thread's origin)


class ThreadLaunched(_Base):
    type: Literal["thread.launched"] = "thread.launched"
    agent: str
    business_key: str = ""


class MessageReceived(_Base):
    type: Literal["message.received"] = "message.received"
    text: str
    user: str = ""


class ToolCall(_Base):
    """The agent's decision to call a tool (before any approval or execution)."""

    type: Literal["tool.call"] = "tool.call"
    call_id: str
    tool: str
    args: dict[str, Any]
    reason: str = ""
    llm: LLMInfo | None = None


class ToolStarted(_Base):
    """Recorded before a tool runs, with the idempotency key the tool receives."""

    type: Literal["tool.started"] = "tool.started"
    call_id: str
    args_hash: str


class ToolResult(_Base):
    type: Literal["tool.result"] = "tool.result"
    call_id: str
    ok: bool
    result: Any = None
    error: str = ""


class ApprovalRequested(_Base):
    type: Literal["approval.requested"] = "approval.requested"
    approval_id: str
    call_id: str
    tool: str
    args: dict[str, Any]
    args_hash: str
    approvers: list[str]
    reason: str = ""
    expires_at: int = 0  # epoch ms after which nobody may decide (0: never; logs from before expiry existed)


class ApprovalDecided(_Base):
    type: Literal["approval.decided"] = "approval.decided"
    approval_id: str
    approved: bool
    by: str
    feedback: str = ""
    args: dict[str, Any] | None = None  # edited arguments, when the approver changed them
    args_hash: str = ""  # the exact call approved
    expired: bool = False  # nobody decided in time: recorded by the expirer, not a person (approved is False)


class Reply(_Base):
    """A message from the agent to the thread's humans; it ends the agent's turn."""

    type: Literal["reply"] = "reply"
    text: str
    llm: LLMInfo | None = None


class HumanAsked(_Base):
    type: Literal["human.asked"] = "human.asked"
    question: str
    escalation: bool = False  # asked by the runtime (errors, loops), not by the agent
    llm: LLMInfo | None = None


class HumanAnswered(_Base):
    type: Literal["human.answered"] = "human.answered"
    text: str
    by: str = ""


class Error(_Base):
    """A step that went wrong (malformed model output, unknown tool...); compact, fed back to the model."""

    type: Literal["error"] = "error"
    kind: str
    message: str
    llm: LLMInfo | None = None


class ModelUnavailable(_Base):
    """The model could not be reached (rate limit, timeout, 5xx); the step is tried again after ``retry_in_ms``."""

    type: Literal["model.unavailable"] = "model.unavailable"
    error: str
    attempt: int  # how many tries have failed in a row, this one included
    retry_in_ms: int
    notified: bool = False  # the thread's humans were told with this event


class ThreadPaused(_Base):
    type: Literal["thread.paused"] = "thread.paused"
    by: str = ""


class ThreadResumed(_Base):
    type: Literal["thread.resumed"] = "thread.resumed"
    by: str = ""


class ThreadCancelled(_Base):
    type: Literal["thread.cancelled"] = "thread.cancelled"
    by: str = ""
    reason: str = ""


class ThreadFailed(_Base):
    type: Literal["thread.failed"] = "thread.failed"
    reason: str


Event = Annotated[
    ThreadLaunched
    | MessageReceived
    | ToolCall
    | ToolStarted
    | ToolResult
    | ApprovalRequested
    | ApprovalDecided
    | Reply
    | HumanAsked
    | HumanAnswered
    | Error
    | ModelUnavailable
    | ThreadPaused
    | ThreadResumed
    | ThreadCancelled
    | ThreadFailed,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: dict[str, Any]) -> Event:
    """Validate a dict into an Event; raises pydantic.ValidationError with a readable reason."""
    return EVENT_ADAPTER.validate_python(data)
