"""What the console's pages show, built from the thread logs and approval records (no I/O but what is passed in).

Everything here is data for the templates; the templates escape every value (Jinja2 autoescape), so agent
output, user messages and tool arguments are shown as text, never as HTML.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from bot import codec
from bot.approvals import ApprovalRecord
from bot.control import SentPrompt
from bot.events import ApprovalDecided, ApprovalRequested, Event
from bot.threads import Thread
from bot.timeline import summary

# Statuses and their colour class in console.css.
TONE = {
    "running": "busy", "waiting_approval": "wait", "waiting_human": "wait", "paused": "idle", "done": "ok",
    "failed": "bad", "cancelled": "idle", "pending": "wait", "approved": "ok", "rejected": "bad",
    "expired": "idle",
}  # fmt: skip


def pretty(value: Any) -> str:
    """JSON, indented, keys in order: how arguments and events are shown."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Card:
    """An approval, as a card with its controls: from the thread's request and the record's state."""

    id: str
    thread_id: str
    tool: str
    args: dict[str, Any]
    approvers: list[str]
    reason: str
    requested_at: int
    state: str = "pending"
    by: str = ""
    at: int = 0
    may_decide: bool = False
    error: str = ""  # what was wrong with the last attempt, shown in place
    notice: str = ""  # what the last attempt did ("approved by console:admin")
    args_text: str = ""  # the edited arguments as typed, kept when they were refused
    expires_at: int = 0  # when nobody may decide any more (0: never, a request from before expiry existed)

    def __post_init__(self) -> None:
        self.args_text = self.args_text or pretty(self.args)

    @classmethod
    def of_record(cls, rec: ApprovalRecord, identity: str) -> Card:
        return cls(rec.id, rec.thread_id, rec.tool, rec.args, list(rec.approvers), rec.reason, rec.requested_at,
                   rec.state, rec.by, rec.at, may_decide=may_decide(identity, rec.approvers),
                   expires_at=rec.expires_at)  # fmt: skip

    @classmethod
    def of_request(cls, req: ApprovalRequested, decided: ApprovalDecided | None, identity: str) -> Card:
        card = cls(req.approval_id, req.thread_id, req.tool, req.args, list(req.approvers), req.reason, req.at,
                   may_decide=may_decide(identity, req.approvers), expires_at=req.expires_at)  # fmt: skip
        if decided is not None:
            card.state = "approved" if decided.approved else "expired" if decided.expired else "rejected"
            card.by, card.at = decided.by, decided.at
        return card


def may_decide(identity: str, approvers: Any) -> bool:
    """Whether the console user is among the approvers (the core checks again when deciding)."""
    kind = identity.partition(":")[0]
    return identity in approvers or f"{kind}:*" in approvers


@dataclass
class Row:
    """One event of a timeline."""

    index: int
    type: str
    at: int
    text: str
    body: str  # the event as pretty JSON
    tone: str = ""
    llm: dict[str, Any] | None = None
    prompt: str | None = None  # the exact request sent to the model for this step, when it was a model step
    prompt_verified: bool = False
    tools: str | None = None  # the tool schemas sent with it


def timeline(thread: Thread, prompts: dict[int, SentPrompt]) -> list[Row]:
    rows = []
    for n, e in enumerate(thread.events):
        data = codec.event_to_dict(e)
        llm = data.pop("llm", None)
        tone = {"error": "bad", "thread.failed": "bad", "reply": "ok", "approval.requested": "wait"}.get(e.type, "")
        if isinstance(e, ApprovalDecided):
            tone = "ok" if e.approved else "bad"
        sent = prompts.get(n)
        rows.append(Row(n, e.type, e.at, summary(e), pretty(data), tone, llm,
                        pretty(sent.messages) if sent else None, bool(sent and sent.verified),
                        pretty(sent.tools) if sent else None))  # fmt: skip
    return rows


@dataclass
class Line:
    """One item of a chat conversation."""

    who: str  # "you", "agent", "note"
    text: str
    at: int
    card: Card | None = None
    tone: str = ""


@dataclass
class Conversation:
    thread_id: str
    agent: str
    status: str
    lines: list[Line] = field(default_factory=list)


def conversation(thread: Thread, identity: str) -> Conversation:
    decided = {e.approval_id: e for e in thread.events if isinstance(e, ApprovalDecided)}
    conv = Conversation(thread.id, thread.agent, str(thread.status))
    for e in thread.events:
        line = _line(e, decided, identity)
        if line is not None:
            conv.lines.append(line)
    return conv


def _line(e: Event, decided: dict[str, ApprovalDecided], identity: str) -> Line | None:
    match e.type:
        case "message.received":
            return Line("you" if e.user == identity else "human", f"{e.user or 'someone'}: {e.text}", e.at)
        case "human.answered":
            return Line("human", f"{e.by} answered: {e.text}", e.at)
        case "reply":
            return Line("agent", e.text, e.at, tone="ok")
        case "human.asked":
            return Line("agent", e.question, e.at, tone="wait")
        case "approval.requested":
            return Line("agent", "", e.at, card=Card.of_request(e, decided.get(e.approval_id), identity))
        case "approval.decided":
            return Line("note", summary(e), e.at, tone="ok" if e.approved else "bad")
        case "tool.call" | "tool.result" | "error" | "model.unavailable" | "thread.failed" | "thread.cancelled":
            bad = e.type in ("error", "thread.failed") or (e.type == "tool.result" and not e.ok)
            return Line("note", summary(e), e.at, tone="bad" if bad else "")
    return None


@dataclass
class DeadLetter:
    id: str
    stream: str
    error: str
    payload: str
    at: int


def dead_letter(dlq_id: str, fields: dict[str, str]) -> DeadLetter:
    payload = fields.get("payload", "")
    if payload and not payload.isprintable():  # compressed: shown by size, not as noise
        payload = f"(binary, {len(payload)} characters as stored)"
    return DeadLetter(dlq_id, fields.get("stream", "?"), fields.get("error", ""), payload,
                      int(dlq_id.partition("-")[0] or 0))  # fmt: skip
