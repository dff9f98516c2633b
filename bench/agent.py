"""The benchmark's agent: message -> gated refund call -> (approval) -> instant tool -> reply. No model, no I/O."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from bot.agent import CallTool, SendReply, Step
from bot.events import ApprovalDecided, Event, MessageReceived, ToolResult
from bot.tools import ToolContext, tool

_ASK = re.compile(r"refund\s+(?P<order>[A-Z]\d+)\s+(?P<cents>\d+)")


class Refund(BaseModel):
    order_id: str = Field(description="The order number, e.g. A100", min_length=1, max_length=32)
    amount_cents: int = Field(description="How much to refund, in cents", gt=0)


@tool
async def issue_refund(args: Refund, ctx: ToolContext) -> dict[str, Any]:
    """Refund (part of) an order. Instant: the benchmark times the runtime, not a payment provider."""
    return {"refund_id": f"R-{ctx.call_id[-6:]}", "order_id": args.order_id, "amount_cents": args.amount_cents}


def bench_desk(events: Sequence[Event]) -> Step:
    """'... refund A1234 500 ...' -> issue_refund (gated) -> reply; anything else gets a one-line hint."""
    last = events[-1]
    if isinstance(last, MessageReceived):
        match = _ASK.search(last.text)
        if match is None:
            return SendReply("Say 'refund A1234 500' to refund 500 cents on order A1234.")
        return CallTool(
            "issue_refund",
            {"order_id": match["order"], "amount_cents": int(match["cents"])},
            reason=f"{last.user or 'the customer'} asked for a refund on order {match['order']}",
        )
    if isinstance(last, ApprovalDecided) and not last.approved:
        return SendReply(f"OK, no refund: {last.by} rejected it.")
    if isinstance(last, ToolResult):
        if not last.ok:
            return SendReply(f"The refund failed: {last.error}")
        r = last.result
        return SendReply(f"Refunded ${r['amount_cents'] / 100:.2f} on order {r['order_id']} ({r['refund_id']}).")
    return SendReply("Tell me which order to refund, e.g. 'refund A1234 500'.")


async def slow_model(events: Sequence[Event]) -> Step:
    """A scripted model that takes BENCH_MODEL_SECONDS (default 1 s) per call, then replies."""
    await asyncio.sleep(float(os.environ.get("BENCH_MODEL_SECONDS", "1")))
    return SendReply("noted")
