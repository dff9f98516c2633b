"""The context window (factor 3): a thread rendered as one compact prompt, XML-ish tags with YAML bodies."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import yaml

from bot.events import Error, Event

# Bookkeeping the model does not need to see.
_HIDDEN = frozenset({"tool.started", "thread.launched", "model.unavailable"})
_AGENT_STEPS = frozenset({"tool.call", "reply", "human.asked"})


def _body(event: Event) -> dict[str, Any]:
    match event.type:
        case "message.received":
            return {"from": event.user or (event.ref.user if event.ref else ""), "text": event.text}
        case "tool.call":
            return {"id": event.call_id, "tool": event.tool, "args": event.args} | (
                {"reason": event.reason} if event.reason else {}
            )
        case "tool.result":
            return {"id": event.call_id} | ({"result": event.result} if event.ok else {"error": event.error})
        case "approval.requested":
            return {"id": event.call_id, "tool": event.tool, "approvers": event.approvers}
        case "approval.decided":
            body: dict[str, Any] = {"decision": "approved" if event.approved else "rejected", "by": event.by}
            if event.feedback:
                body["feedback"] = event.feedback
            if event.args is not None:
                body["edited_args"] = event.args
            return body
        case "reply":
            return {"text": event.text}
        case "human.asked":
            return {"question": event.question}
        case "human.answered":
            return {"by": event.by, "text": event.text}
        case "error":
            return {"kind": event.kind, "message": event.message}
        case "thread.paused" | "thread.resumed" | "thread.cancelled":
            return {"by": event.by}
        case "thread.failed":
            return {"reason": event.reason}
    return {}


def visible(events: Sequence[Event]) -> list[Event]:
    """Hide bookkeeping, and errors the agent has since recovered from."""
    out: list[Event] = []
    for i, e in enumerate(events):
        if e.type in _HIDDEN:
            continue
        if isinstance(e, Error) and any(later.type in _AGENT_STEPS for later in events[i + 1 :]):
            continue
        out.append(e)
    return out


def render(events: Sequence[Event]) -> str:
    parts = []
    for e in visible(events):
        tag = e.type.replace(".", "_")
        body = yaml.safe_dump(_body(e), sort_keys=False, allow_unicode=True, width=1000).strip()
        parts.append(f"<{tag}>\n{body}\n</{tag}>")
    return "\n\n".join(parts)


def request_sha(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """Fingerprint of exactly what was sent, so a re-rendered prompt can be proven identical."""
    blob = json.dumps([messages, tools], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
