"""Human-readable renderings of a thread: one line per event, and the prompts the model was sent."""

from __future__ import annotations

import datetime as dt
import json

from bot.events import Event


def clock(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M:%S")


def summary(e: Event) -> str:
    """One line saying what the event was."""
    match e.type:
        case "thread.launched":
            return f"launched agent {e.agent} from {e.ref.kind if e.ref else '?'}"
        case "message.received":
            return f"{e.user or 'someone'}: {e.text}"
        case "tool.call":
            return f"call {e.tool}({json.dumps(e.args, sort_keys=True)}) [{e.call_id}]"
        case "tool.started":
            return f"started {e.call_id}"
        case "tool.result":
            return f"result {e.call_id}: " + (json.dumps(e.result, default=str) if e.ok else f"ERROR {e.error}")
        case "approval.requested":
            return f"approval requested for {e.tool} [{e.approval_id}] from {', '.join(e.approvers)}"
        case "approval.decided":
            verdict = "approved" if e.approved else "rejected"
            return (
                f"{verdict} by {e.by}"
                + (f": {e.feedback}" if e.feedback else "")
                + (f" with edited args {json.dumps(e.args, sort_keys=True)}" if e.args is not None else "")
            )
        case "reply":
            return f"reply: {e.text}"
        case "human.asked":
            return ("escalated: " if e.escalation else "asked: ") + e.question
        case "human.answered":
            return f"{e.by} answered: {e.text}"
        case "error":
            return f"error {e.kind}: {e.message}"
        case "model.unavailable":
            return f"model unavailable, retrying in {e.retry_in_ms / 1000:g} s (try {e.attempt}): {e.error}"
        case "thread.paused" | "thread.resumed":
            return f"{e.type.split('.')[1]} by {e.by or '-'}"
        case "thread.cancelled":
            return f"cancelled by {e.by or '-'}" + (f": {e.reason}" if e.reason else "")
        case "thread.failed":
            return f"failed: {e.reason}"
    return e.type


def line(e: Event) -> str:
    text = f"{clock(e.at)}  {e.type:<19} {summary(e)}"
    llm = getattr(e, "llm", None)
    if llm is not None:
        text += f"  [{llm.model}, {llm.tokens_in}+{llm.tokens_out} tokens, ${llm.cost:.6f}]"
    return text
