"""Terminal chat: talk to an agent and decide its approvals at the prompt, through the same streams as Slack.

Messages go onto the inbound stream like any channel's; what the agent says comes back through the
``terminal`` outbox, which each chat session reads in its own consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, TextIO

import yaml

from bot import control, threads
from bot.channel import BaseChannel
from bot.errors import HandrailError
from bot.events import ChannelRef, new_id
from bot.outbox import Outbound, OutboxConsumer, Receipt
from bot.runtime import Deps
from bot.threads import Status
from bot.timeline import line

KIND = "terminal"
HELP = """\
Type a message to the agent. When it asks for approval:
  y | /approve [json args]   approve (optionally with edited arguments as JSON)
  n <reason> | /reject <reason>   reject, telling the agent why
Other commands: /status, /help, /quit"""


class TerminalChat:
    def __init__(
        self, deps: Deps, *, agent: str, identity: str, thread_id: str | None = None, out: TextIO = sys.stdout
    ) -> None:
        self.deps, self.agent, self.identity, self.out = deps, agent, identity, out
        self.thread_id = thread_id or new_id()
        self.resuming = thread_id is not None
        self.ref = ChannelRef(kind=KIND, address=self.thread_id, user=identity)
        self.pending_approval: str | None = None
        self.awaiting: str | None = None  # key of the last event we sent, until the thread has applied it
        self.outbox = OutboxConsumer(
            deps.redis, deps.keys, KIND, self.deliver, group=f"chat:{self.thread_id}", start="$",
            delete_delivered=False,
        )  # fmt: skip

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def deliver(self, msg: Outbound) -> Receipt | None:
        """Show what the agent says; messages of other chat sessions are not ours."""
        if msg.thread_id != self.thread_id:
            return None
        if msg.kind == "approval_request" and msg.approval:
            self.card(msg.approval)
        elif msg.kind == "approval_update":
            if msg.approval and msg.approval.get("id") == self.pending_approval:
                self.pending_approval = None
            self.say(f"   {'✔' if msg.approval and msg.approval.get('approved') else '✘'} {msg.text}")
        elif msg.kind == "question":
            self.say(f"{self.agent} asks: {msg.text}")
        elif msg.kind == "error":
            self.say(f"! {msg.text}")
        else:
            self.say(f"{self.agent}: {msg.text}")
        return Receipt(channel_id=f"{KIND}:{self.thread_id}:{msg.id}")

    def card(self, approval: dict[str, Any]) -> None:
        """What a pending approval will run, who may decide it, and how to answer."""
        self.pending_approval = approval["id"]
        args = yaml.safe_dump(approval["args"], sort_keys=False).strip().replace("\n", "\n    ")
        self.say(f"\n⏸  {self.agent} wants to run {approval['tool']}:\n    {args}")
        if approval.get("reason"):
            self.say(f"   why: {approval['reason']}")
        self.say(f"   approvers: {', '.join(approval['approvers'])}   [approval {approval['id']}]")
        self.say("   approve: y    reject: n <reason>")

    async def status(self) -> Status | None:
        thread = await threads.load(self.deps.redis, self.deps.keys, self.thread_id)
        return thread.status if thread.events else None

    async def _busy(self) -> bool:
        thread = await threads.load(self.deps.redis, self.deps.keys, self.thread_id)
        if self.awaiting and not thread.has_key(self.awaiting):
            return True
        self.awaiting = None
        return bool(thread.events) and thread.status is Status.RUNNING

    async def _shown_all(self) -> bool:
        """Whether our outbox consumer has delivered everything on the stream so far."""
        redis, stream = self.deps.redis, self.outbox.stream
        last = (await redis.xinfo_stream(stream))["last-generated-id"]
        for g in await redis.xinfo_groups(stream):
            if g["name"].decode() == self.outbox.group:
                return bool(g["pending"] == 0 and g["last-delivered-id"] == last)
        return True

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until the agent has finished its turn and everything it said is shown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not await self._busy() and await self._shown_all():
                return
            await asyncio.sleep(0.05)
        self.say("(the agent is still working; is a worker running? `handrail up` starts one)")

    async def handle(self, text: str) -> bool:
        """One line of input; False ends the chat."""
        text = text.strip()
        if not text:
            return True
        if text in ("/quit", "/exit"):
            return False
        if text == "/help":
            self.say(HELP)
            return True
        if text == "/status":
            self.say(f"thread {self.thread_id}: {await self.status() or 'not started'}")
            return True
        word, _, rest = text.partition(" ")
        if self.pending_approval and word in ("y", "yes", "/approve"):
            await self.decide(True, edited=rest.strip() or None)
            return True
        if self.pending_approval and word in ("n", "no", "/reject"):
            await self.decide(False, feedback=rest.strip())
            return True
        if word in ("/approve", "/reject"):
            self.say("nothing is waiting for approval")
            return True
        self.awaiting = f"msg:{new_id()}"
        await control.receive(self.deps, self.thread_id, text, self.ref, key=self.awaiting, agent=self.agent)
        return True

    async def decide(self, approved: bool, *, feedback: str = "", edited: str | None = None) -> None:
        assert self.pending_approval is not None
        args = None
        if edited:
            try:
                args = yaml.safe_load(edited)
            except yaml.YAMLError:
                args = None
            if not isinstance(args, dict):
                self.say('edited arguments must be a JSON object, e.g. /approve {"amount_cents": 500}')
                return
        try:
            outcome = await control.decide(
                self.deps, self.pending_approval, by=self.identity, approved=approved, feedback=feedback, args=args
            )
        except HandrailError as exc:
            self.say(f"! {exc}")
            return
        if outcome.result == "ok":
            self.awaiting = f"approval:{self.pending_approval}"
        else:
            self.say(f"! {outcome.message}")

    async def run(self, lines: AsyncIterator[str]) -> None:
        await self.outbox.ensure_group()
        stop = asyncio.Event()
        pump = asyncio.create_task(self.outbox.run(stop))  # replies stream in while you type
        try:
            if self.resuming:
                thread = await threads.get(self.deps.redis, self.deps.keys, self.thread_id)
                for e in thread.events:
                    self.say(line(e))
                request = thread.open_approval()
                if request is not None:  # its card went out before this session: show it again
                    self.card({"id": request.approval_id, "tool": request.tool, "args": request.args,
                               "reason": request.reason, "approvers": request.approvers})  # fmt: skip
            self.say(f"Chatting with {self.agent} as {self.identity} (thread {self.thread_id}). /help for help.")
            async for text in lines:
                await self.settle()
                if not await self.handle(text):
                    break
                await self.settle()
        finally:
            stop.set()
            await pump
            await self.outbox.close()


async def stdin_lines(prompt: str = "> ") -> AsyncIterator[str]:
    """Lines from standard input without blocking the event loop; a prompt only on a terminal.

    Each read runs in a daemon thread of its own, never in the loop's executor: asyncio.run waits for its
    executor at exit, so Ctrl-C would end the chat only after the next Enter.
    """
    loop = asyncio.get_running_loop()
    interactive = sys.stdin.isatty()
    while True:
        line: asyncio.Future[str | None] = loop.create_future()
        threading.Thread(target=_read_line, args=(loop, line, prompt if interactive else None), daemon=True).start()
        text = await line
        if text is None:
            return
        yield text.rstrip("\n")


def _read_line(loop: asyncio.AbstractEventLoop, line: asyncio.Future[str | None], prompt: str | None) -> None:
    """One line into ``line`` (None at the end of input); ``prompt`` None reads a pipe or file, unprompted."""
    try:
        text: str | None = input(prompt) if prompt is not None else _read_fd_line()
    except (EOFError, OSError, ValueError):
        text = None
    with contextlib.suppress(RuntimeError):  # the loop has closed: the chat ended meanwhile
        loop.call_soon_threadsafe(_settle, line, text)


def _settle(line: asyncio.Future[str | None], text: str | None) -> None:
    if not line.done():  # a cancelled read (Ctrl-C) takes no line
        line.set_result(text)


def _read_fd_line() -> str | None:
    """A line read from fd 0 byte by byte: no lock of sys.stdin's buffer is held by a thread blocked here, which
    would stop the interpreter from exiting after Ctrl-C."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            break
        data += byte
    return data.decode(errors="replace") if data else None


__all__ = ["TerminalChat", "stdin_lines"]


class TerminalChannel(BaseChannel):
    """`handrail chat`: each chat session reads the ``terminal`` outbox with a consumer group of its own."""

    name = "terminal"


channel = TerminalChannel()
