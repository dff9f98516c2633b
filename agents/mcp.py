"""The "mcp" agent: another agent (Claude Code, Cursor...) asks a human through Handrail over MCP.

Each MCP request opens a thread whose first message is a JSON object, written by the MCP channel:

    {"request": "approval", "action": "...", "arguments": {...}, "approvers": [...]}
    {"request": "question", "question": "...", "choices": [...], "urgency": "normal"}

An approval becomes a call of ``approved_action`` (gated in the config, so the card goes out like any other); a
question becomes a HumanAsked. The decision or answer is read back from the thread's log by the channel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from bot.agent import AskHuman, CallTool, SendReply, Step
from bot.events import ApprovalDecided, Event, HumanAnswered, MessageReceived, ToolResult
from bot.tools import ToolContext, tool


class Action(BaseModel):
    action: str = Field(description="What the requesting agent wants to do", min_length=1, max_length=2_000)
    arguments: dict[str, Any] = Field(default_factory=dict, description="The arguments it would do it with")


@tool
async def approved_action(args: Action, ctx: ToolContext) -> dict[str, Any]:
    """Let another agent go ahead with an action (needs a human's approval). Runs nothing here: the requesting
    agent does the action itself once it reads the decision."""
    return {"approved": True, "action": args.action, "arguments": args.arguments}


def _request(events: Sequence[Event]) -> dict[str, Any] | None:
    first = next((e for e in events if isinstance(e, MessageReceived)), None)
    try:
        data = json.loads(first.text) if first else None
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("request") in ("approval", "question") else None


def question_text(question: str, choices: Sequence[str] = (), urgency: str = "normal") -> str:
    """The question as a human reads it: urgency first, then the choices to answer with."""
    text = ("[URGENT] " if urgency == "high" else "") + question
    if choices:
        text += "\nAnswer with one of: " + ", ".join(choices)
    return text


def human_gate(events: Sequence[Event]) -> Step:
    """A deterministic agent: an MCP request in, one approval or one question out, then a closing reply."""
    request = _request(events)
    last = events[-1]
    if request is None:
        return SendReply("This agent takes requests from MCP clients (request_approval, ask_human) only.")
    if isinstance(last, MessageReceived) and len([e for e in events if isinstance(e, MessageReceived)]) == 1:
        if request["request"] == "approval":
            return CallTool(
                "approved_action",
                {"action": str(request.get("action", "")), "arguments": request.get("arguments") or {}},
                reason=str(request.get("action", "")),
                approvers=tuple(request.get("approvers") or ()),
            )
        return AskHuman(question_text(str(request.get("question", "")), request.get("choices") or (),
                                      str(request.get("urgency", "normal"))))  # fmt: skip
    decided = next((e for e in reversed(events) if isinstance(e, ApprovalDecided)), None)
    if isinstance(last, ToolResult) and decided is not None:
        verdict = "approved" if decided.approved else "rejected"
        why = f": {decided.feedback}" if decided.feedback else "."
        return SendReply(f"{decided.by} {verdict} it{why} The requesting agent has been told.")
    if isinstance(last, HumanAnswered):
        return SendReply(f"Thanks, {last.by or 'human'}: your answer went back to the requesting agent.")
    return SendReply("This request is settled; start a new one from the MCP client.")
