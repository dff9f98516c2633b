"""An agent whose gated tool is slow, so a test can kill the worker while it runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from bot.agent import CallTool, SendReply, Step
from bot.events import Event, MessageReceived, ToolResult
from bot.tools import ToolContext, tool


class SlowRefund(BaseModel):
    order_id: str


@tool
async def slow_refund(args: SlowRefund, ctx: ToolContext) -> dict[str, Any]:
    """Refund slowly; every run is logged, the refund itself happens once per idempotency key."""
    redis, ns = ctx.deps.redis, ctx.deps.keys.ns
    await redis.rpush(f"{ns}:slow:runs", ctx.idempotency_key)
    await asyncio.sleep(float(os.environ.get("SLOW_TOOL_SECONDS", "0")))
    await redis.hsetnx(f"{ns}:slow:ledger", ctx.idempotency_key, args.order_id)
    return {"refunded": args.order_id}


def slow_desk(events: Sequence[Event]) -> Step:
    last = events[-1]
    if isinstance(last, MessageReceived):
        return CallTool("slow_refund", {"order_id": last.text.split()[-1]})
    if isinstance(last, ToolResult):
        return SendReply(f"done: {last.result}")
    return SendReply("rejected, fine")


FAIL = {"on": False}  # flipped by a test to make the flaky agent's step raise


def flaky(events: Sequence[Event]) -> Step:
    if FAIL["on"]:
        raise RuntimeError("the flaky agent is failing on purpose")
    return SendReply("fine now")


class NoArgs(BaseModel):
    pass


@tool
async def hang(args: NoArgs, ctx: ToolContext) -> str:
    """Never finishes (a tool stuck on a dead connection); its agent gives tools 1 s."""
    await ctx.deps.redis.rpush(f"{ctx.deps.keys.ns}:hang:runs", ctx.idempotency_key)
    await asyncio.sleep(3600)
    return "unreachable"


def hang_desk(events: Sequence[Event]) -> Step:
    last = events[-1]
    if isinstance(last, MessageReceived):
        return CallTool("hang", {}) if last.text == "hang" else CallTool("slow_refund", {"order_id": last.text})
    if isinstance(last, ToolResult):
        return SendReply(f"ok: {last.result}" if last.ok else f"failed: {last.error}")
    return SendReply("?")
