"""Example agents for a small shop: look up orders, and refund them only with a human's approval."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from bot.agent import CallTool, SendReply, Step
from bot.events import ApprovalDecided, Event, MessageReceived, ToolCall, ToolResult
from bot.tools import ToolContext, tool

# A stand-in order book; a real deployment's tool would call the shop's API instead.
ORDERS: dict[str, dict[str, Any]] = {
    "A100": {"customer": "ada@example.com", "item": "mechanical keyboard", "total_cents": 12900},
    "A101": {"customer": "grace@example.com", "item": "USB-C cable", "total_cents": 1900},
    "A102": {"customer": "linus@example.com", "item": "standing desk", "total_cents": 45000},
}


class OrderRef(BaseModel):
    order_id: str = Field(description="The order number, e.g. A100", min_length=1, max_length=32)


class Refund(BaseModel):
    order_id: str = Field(description="The order number, e.g. A100", min_length=1, max_length=32)
    amount_cents: int = Field(description="How much to refund, in cents", gt=0)


class NoArgs(BaseModel):
    pass


@tool(repeatable=True)  # no side effects: the same lookup may run again later in a thread
async def lookup_order(args: OrderRef, ctx: ToolContext) -> dict[str, Any]:
    """Look up an order by its number: customer, item and total."""
    order = ORDERS.get(args.order_id.upper())
    if order is None:
        raise LookupError(f"no order {args.order_id}")
    return {"order_id": args.order_id.upper(), **order}


@tool
async def issue_refund(args: Refund, ctx: ToolContext) -> dict[str, Any]:
    """Refund (part of) an order to the customer's card. Needs a human's approval."""
    order = ORDERS.get(args.order_id.upper())
    if order is None:
        raise LookupError(f"no order {args.order_id}")
    if args.amount_cents > order["total_cents"]:
        raise ValueError(f"cannot refund {args.amount_cents} cents of a {order['total_cents']}-cent order")
    # The payment provider de-duplicates on the idempotency key; the ledger below stands in for it.
    ledger = f"{ctx.deps.keys.ns}:refunds"
    ref = f"R-{ctx.call_id[-6:]}"
    await ctx.deps.redis.hsetnx(ledger, ctx.idempotency_key, f"{args.order_id.upper()}:{args.amount_cents}:{ref}")
    stored = (await ctx.deps.redis.hget(ledger, ctx.idempotency_key)).decode()
    return {"refund_id": stored.rsplit(":", 1)[1], "order_id": args.order_id.upper(), "amount_cents": args.amount_cents}


@tool(repeatable=True)
async def refund_policy(args: NoArgs, ctx: ToolContext) -> str:
    """The shop's refund policy."""
    return "Refunds up to the order total within 30 days of delivery; partial refunds are fine."


_ASK = re.compile(r"refund\s+(?:order\s+)?#?(?P<order>[A-Za-z]\d+)(?:\s+\$?(?P<amount>\d+(?:\.\d{1,2})?))?", re.I)


def refund_desk(events: Sequence[Event]) -> Step:
    """A deterministic agent: 'refund A100' or 'refund A100 25' -> look up -> refund (gated) -> reply."""
    last = events[-1]
    ask = next((e for e in reversed(events) if isinstance(e, MessageReceived)), None)
    match = _ASK.search(ask.text) if ask else None
    if isinstance(last, MessageReceived):
        if match is None:
            return SendReply("I can refund orders. Say 'refund A100' for the whole order or 'refund A100 25' for $25.")
        return CallTool("lookup_order", {"order_id": match["order"].upper()})
    rejection = events[-2] if isinstance(last, ToolResult) and len(events) > 1 else last  # recorded with its result
    if isinstance(rejection, ApprovalDecided) and rejection.expired:
        return SendReply(f"I did not refund it: the approval expired ({rejection.feedback}). Ask again if you still "
                         "need it.")  # fmt: skip
    if isinstance(rejection, ApprovalDecided) and not rejection.approved:
        why = f": {rejection.feedback}" if rejection.feedback else "."
        return SendReply(f"OK, I did not refund it. {rejection.by} rejected the refund{why}")
    if isinstance(last, ToolResult):
        call = next(e for e in events if isinstance(e, ToolCall) and e.call_id == last.call_id)
        if not last.ok:
            return SendReply(f"{call.tool} failed: {last.error}")
        if call.tool == "lookup_order" and match is not None:
            order = last.result
            cents = round(float(match["amount"]) * 100) if match["amount"] else order["total_cents"]
            return CallTool(
                "issue_refund",
                {"order_id": order["order_id"], "amount_cents": cents},
                reason=f"{order['customer']} asked for a refund of their {order['item']}",
            )
        if call.tool == "issue_refund":
            r = last.result
            return SendReply(f"Refunded ${r['amount_cents'] / 100:.2f} on order {r['order_id']} ({r['refund_id']}).")
    return SendReply("Tell me which order to refund, e.g. 'refund A100'.")
