"""What an MCP request's thread says so far: pending, or the human's decision or answer. Pure: events in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from bot.events import ApprovalDecided, Event, HumanAnswered, MessageReceived, ThreadFailed
from bot.threads import Status, derive_status

State = Literal["pending", "approved", "rejected", "expired", "answered", "cancelled", "failed"]


class Decision(BaseModel):
    """The structured result of request_approval, ask_human and get_decision."""

    request_id: str = Field(description="Pass to get_decision to wait for (or look up) this request again")
    status: State = Field(description="pending until a human decides (approved / rejected) or answers; expired "
                                "when nobody decided in time")  # fmt: skip
    by: str = Field(default="", description="Who decided or answered, e.g. slack:U123 or api:ops")
    feedback: str = Field(default="", description="Why it was rejected (or the failure, for failed)")
    arguments: dict[str, Any] | None = Field(
        default=None, description="Approved: the arguments to run the action with (the approver may have edited them)"
    )
    edited: bool = Field(default=False, description="Approved with arguments the approver changed")
    answer: str = Field(default="", description="The human's answer to ask_human")
    choice: str | None = Field(default=None, description="The one of the offered choices the answer names, if any")
    at: int = Field(default=0, description="When it was decided or answered (ms since the epoch)")


def request_of(events: Sequence[Event]) -> dict[str, Any]:
    """The MCP request the thread was launched with (its first message, a JSON object)."""
    first = next((e for e in events if isinstance(e, MessageReceived)), None)
    try:
        data = json.loads(first.text) if first else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def decision(request_id: str, events: Sequence[Event]) -> Decision:
    pending = Decision(request_id=request_id, status="pending")
    if not events:
        return pending  # accepted, not started yet
    request = request_of(events)
    for e in events:
        if isinstance(e, ApprovalDecided):
            if not e.approved:
                verdict: State = "expired" if e.expired else "rejected"
                return Decision(request_id=request_id, status=verdict, by=e.by, feedback=e.feedback, at=e.at)
            asked = {"action": request.get("action"), "arguments": request.get("arguments")}
            edited = e.args is not None and e.args != asked  # the action or its arguments changed
            arguments = (e.args or {}).get("arguments") if e.args is not None else request.get("arguments")
            return Decision(request_id=request_id, status="approved", by=e.by, feedback=e.feedback,
                            arguments=arguments or {}, edited=edited, at=e.at)  # fmt: skip
        if isinstance(e, HumanAnswered):
            choices = [str(c) for c in request.get("choices") or ()]
            choice = next((c for c in choices if c.casefold() == e.text.strip().casefold()), None)
            return Decision(request_id=request_id, status="answered", by=e.by, answer=e.text, choice=choice,
                            at=e.at)  # fmt: skip
    status = derive_status(events)
    if status is Status.CANCELLED:
        by = next((getattr(e, "by", "") for e in reversed(events) if e.type == "thread.cancelled"), "")
        return Decision(request_id=request_id, status="cancelled", by=by)
    if status is Status.FAILED:
        reason = next((e.reason for e in reversed(events) if isinstance(e, ThreadFailed)), "")
        return Decision(request_id=request_id, status="failed", feedback=reason)
    return pending
