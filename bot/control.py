"""Launch, message, pause, resume, cancel and decide: the library calls every CLI verb and API route uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from bot import approvals, codec, threads
from bot.context import request_sha
from bot.errors import Conflict, HandrailError, NotFound
from bot.events import (
    ChannelRef,
    Event,
    MessageReceived,
    ThreadCancelled,
    ThreadLaunched,
    ThreadPaused,
    ThreadResumed,
    new_id,
)
from bot.llm import LLMStep
from bot.runtime import Deps
from bot.threads import Status, Thread

T = TypeVar("T")


@dataclass(frozen=True)
class Accepted:
    thread_id: str
    entry: str | None  # None: a repeat of an event already accepted

    @property
    def duplicate(self) -> bool:
        return self.entry is None


async def launch(
    deps: Deps,
    agent: str,
    text: str,
    ref: ChannelRef,
    *,
    thread_id: str | None = None,
    key: str | None = None,
    business_key: str = "",
) -> Accepted:
    """Start a thread for ``agent`` with a first message, or continue it with the message if it was launched
    before; returns once the events are on the inbound stream (``duplicate`` if the message was seen)."""
    deps.agents.agent(agent)  # fails with a clear error for an unknown agent
    thread_id = thread_id or new_id()
    launched = ThreadLaunched(
        thread_id=thread_id, key=f"launch:{thread_id}", agent=agent, ref=ref, business_key=business_key
    )
    first = MessageReceived(thread_id=thread_id, key=key or f"msg:{new_id()}", text=text, user=ref.user, ref=ref)
    # Both or neither: a launched thread never lacks its message, and a repeated message launches nothing.
    entries = await deps.bus.publish_all([launched, first])
    if entries is None:  # launched before (or this message was seen): the message alone continues it, if new
        return Accepted(thread_id, await deps.bus.publish(first))
    return Accepted(thread_id, entries[1])


async def send(deps: Deps, thread_id: str, text: str, ref: ChannelRef, *, key: str | None = None) -> Accepted:
    event = MessageReceived(thread_id=thread_id, key=key or f"msg:{new_id()}", text=text, user=ref.user, ref=ref)
    return Accepted(thread_id, await deps.bus.publish(event))


async def receive(
    deps: Deps,
    thread_id: str,
    text: str,
    ref: ChannelRef,
    *,
    key: str,
    start: bool = True,
    agent: str | None = None,
    business_key: str = "",
) -> Accepted | None:
    """Route an inbound message, for every channel: a thread that exists (or whose launch is on its way) gets the
    message, which answers its question if it waits on a human (decided by the worker, in order); any other thread
    is launched for ``agent`` (default: the channel's route), if ``start`` allows it. None when the message
    belongs to no thread and may not start one (a Slack reply in a thread the bot never joined)."""
    if await known(deps, thread_id):
        return await send(deps, thread_id, text, ref, key=key)
    if not start:
        return None
    agent = agent or deps.agents.route(ref.kind, ref.address)
    return await launch(deps, agent, text, ref, thread_id=thread_id, key=key, business_key=business_key)


async def known(deps: Deps, thread_id: str) -> bool:
    """The thread exists, or its launch is on the inbound stream and not yet applied (partition order applies the
    launch before anything published after it)."""
    return bool(await deps.redis.exists(deps.keys.seen(f"launch:{thread_id}"), deps.keys.log(thread_id)))


async def pending_launch(deps: Deps, thread_id: str) -> ThreadLaunched | None:
    """The launch of a thread that is accepted (on the inbound stream) but maybe not applied yet, or None.

    A 202 means "on the stream": a control request right behind it must find the thread, and partition order
    applies the launch before it."""
    seen = await deps.redis.get(deps.keys.seen(f"launch:{thread_id}"))
    if not seen:
        return None
    entry = seen.decode().rpartition(" ")[2]
    rows = await deps.redis.xrange(deps.keys.inbound_for(thread_id), entry, entry)
    event = codec.decode(rows[0][1][b"e"], thread_id) if rows else None
    return event if isinstance(event, ThreadLaunched) else None


async def _control(deps: Deps, event: Event) -> Accepted:
    if await pending_launch(deps, event.thread_id) is None:
        await threads.get(deps.redis, deps.keys, event.thread_id)  # NotFound for an unknown thread
    return Accepted(event.thread_id, await deps.bus.publish(event))


async def pause(deps: Deps, thread_id: str, by: str) -> Accepted:
    return await _control(deps, ThreadPaused(thread_id=thread_id, key=f"pause:{new_id()}", by=by))


async def resume(deps: Deps, thread_id: str, by: str) -> Accepted:
    return await _control(deps, ThreadResumed(thread_id=thread_id, key=f"resume:{new_id()}", by=by))


async def cancel(deps: Deps, thread_id: str, by: str, reason: str = "") -> Accepted:
    return await _control(deps, ThreadCancelled(thread_id=thread_id, key=f"cancel:{new_id()}", by=by, reason=reason))


async def decide(
    deps: Deps,
    approval_id: str,
    *,
    by: str,
    approved: bool,
    feedback: str = "",
    args: dict[str, Any] | None = None,
) -> approvals.Outcome:
    """Approve or reject; edited ``args`` are checked against the tool's schema before anything is recorded."""
    if args is not None:
        record = await approvals.get(deps.redis, deps.keys, approval_id)
        thread = await threads.get(deps.redis, deps.keys, record.thread_id)
        agent = deps.agents.agents.get(thread.agent)
        if agent is not None and agent.prepare is not None and record.tool not in agent.tools:
            await agent.prepare()  # an MCP server's tool: list the server's tools to check the edit against
        tool = agent.tools.get(record.tool) if agent is not None else None
        if tool is None:  # removed or renamed in the config since the call was proposed
            raise Conflict(
                f"cannot approve edited arguments for {record.tool}: agent {thread.agent!r} no longer has that "
                "tool in its configuration; reject the call instead"
            )
        try:
            args = tool.validate(args).model_dump(mode="json")
        except ValidationError as exc:
            raise HandrailError(f"edited arguments for {record.tool} are invalid: {exc}") from None
    return await approvals.decide(
        deps.redis, deps.keys, approval_id, by=by, approved=approved, feedback=feedback, args=args
    )


@dataclass(frozen=True)
class Summary:
    id: str
    agent: str
    status: Status
    events: int
    updated: int
    channel: str = ""  # the kind of channel the thread was started on


async def list_threads(
    deps: Deps, *, agent: str | None = None, status: str | None = None, limit: int = 50
) -> list[Summary]:
    """Up to ``limit`` matching threads, most recently active first, looking through the whole index."""
    out: list[Summary] = []
    cursor: str | None = None
    while len(out) < limit:
        page = await threads_page(deps, agent=agent, status=status, limit=limit - len(out), cursor=cursor)
        out += page.items
        if page.next is None:
            break
        cursor = page.next
    return out


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next: str | None  # the cursor of the following page; None: this is the last


SCAN_PER_ITEM = 4  # index entries a filtered page looks at per item asked for: bounded work, maybe a short page


class BadCursor(HandrailError):
    """A pagination cursor this server did not hand out."""


def _cursor(score: float, member: str) -> str:
    return f"{int(score)}:{member}"


def _uncursor(cursor: str) -> tuple[int, str]:
    score, sep, member = cursor.partition(":")
    if not (sep and score.isascii() and score.isdigit() and member):
        raise BadCursor(f"cursor {cursor[:80]!r} is not one this server handed out; start again without one")
    return int(score), member


async def walk_index(
    deps: Deps, key: str, *, cursor: str | None, budget: int, newest_first: bool
) -> tuple[list[tuple[str, float]], str | None]:
    """Up to ``budget`` (member, score) pairs of a sorted set after ``cursor`` (by score, then member, as Redis
    orders them), and the cursor after the last; None when the index is exhausted. Equal scores are told apart by
    the member in the cursor, so a page boundary inside a tie loses nothing."""
    after = _uncursor(cursor) if cursor else None
    out: list[tuple[str, float]] = []
    offset, exhausted = 0, False
    while len(out) < budget and not exhausted:
        want = budget - len(out)
        if newest_first:
            top = after[0] if after else "+inf"
            rows = await deps.redis.zrevrangebyscore(key, top, "-inf", start=offset, num=want, withscores=True)
        else:
            low = after[0] if after else "-inf"
            rows = await deps.redis.zrangebyscore(key, low, "+inf", start=offset, num=want, withscores=True)
        offset += len(rows)
        exhausted = len(rows) < want
        for raw, score in rows:
            member = raw.decode()
            if after and int(score) == after[0] and (member >= after[1] if newest_first else member <= after[1]):
                continue  # at or before the cursor within a tie of scores
            out.append((member, score))
    if exhausted:
        return out, None
    return out, _cursor(out[-1][1], out[-1][0])


async def threads_page(
    deps: Deps, *, agent: str | None = None, status: str | None = None, limit: int = 50, cursor: str | None = None,
    agents: frozenset[str] | None = None, channel: str | None = None,
) -> Page[Summary]:  # fmt: skip
    """One page of threads, most recently active first, filtered by agent, status and the kind of channel it
    started on (and, for a caller limited to some agents, ``agents``). A filtered page looks at most
    ``SCAN_PER_ITEM * limit`` threads, so it may hold fewer than ``limit`` (even none) while ``next`` still leads
    on; follow ``next`` until it is None."""
    filtered = bool(agent or status or channel or agents is not None)
    ids, after = await walk_index(
        deps, deps.keys.threads, cursor=cursor, budget=limit * SCAN_PER_ITEM if filtered else limit, newest_first=True
    )
    out: list[Summary] = []
    for n, (tid, score) in enumerate(ids):
        t = await threads.load(deps.redis, deps.keys, tid)
        if not t.events or (agent and t.agent != agent) or (status and t.status != status):
            continue
        if agents is not None and t.agent not in agents:
            continue
        kind = t.origin.kind if t.origin else ""
        if channel and kind != channel:
            continue
        out.append(Summary(t.id, t.agent, t.status, len(t.events), t.events[-1].at, kind))
        if len(out) == limit and n < len(ids) - 1:  # full before the budget ran out: resume right after this one
            return Page(out, _cursor(score, tid))
    return Page(out, after)


async def approvals_page(
    deps: Deps, *, limit: int = 100, cursor: str | None = None, agents: frozenset[str] | None = None
) -> Page[approvals.ApprovalRecord]:
    """One page of approvals waiting for a decision, the soonest to expire first; follow ``next`` until it is
    None. For a caller limited to some ``agents``, only their threads' approvals: such a page may hold fewer than
    ``limit``."""
    rows, after = await walk_index(deps, deps.keys.pending_approvals, cursor=cursor, budget=limit, newest_first=False)
    records = await approvals.records(deps.redis, deps.keys, [i for i, _ in rows])
    if agents is not None:
        owners = await threads.agents_of(deps.redis, deps.keys, [r.thread_id for r in records])
        records = [r for r, agent in zip(records, owners, strict=True) if agent in agents]
    return Page(records, after)


@dataclass(frozen=True)
class SentPrompt:
    messages: list[dict[str, Any]]
    verified: bool  # the re-rendered request hashes to what was recorded as sent
    tools: list[dict[str, Any]] = field(default_factory=list)  # the tool schemas sent with it


def prompt_of(deps: Deps, thread: Thread, index: int) -> SentPrompt | None:
    """Rebuild the exact request the model saw for the step recorded at ``thread.events[index]``."""
    llm = getattr(thread.events[index], "llm", None)
    if llm is None:
        return None
    step = deps.agents.agent(thread.agent).step
    if not isinstance(step, LLMStep):
        return None
    messages, tools, _ = step.request(thread.events[: llm.prompt_upto])
    return SentPrompt(messages, request_sha(messages, tools) == llm.prompt_sha, list(tools))


__all__ = [
    "Accepted", "BadCursor", "NotFound", "Page", "approvals_page", "cancel", "decide", "known", "launch",
    "list_threads", "pause", "pending_launch", "receive", "resume", "send", "threads_page", "walk_index",
]  # fmt: skip
