"""The owned loop: apply an inbound event to a thread and run the thread until it waits on the outside.

Every change is an event appended to the thread's log in a fenced, atomic commit; a worker that dies
anywhere here leaves a log from which the next worker carries on without repeating a completed tool call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from bot import approvals, codec, outage
from bot.agent import Agent, AskHuman, CallTool, Malformed, SendReply, StepOutcome
from bot.bus import Command
from bot.errors import ApprovalRequired, ModelNotConfigured, ModelRefused, ModelUnavailableError
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    Error,
    Event,
    HumanAnswered,
    HumanAsked,
    MessageReceived,
    ModelUnavailable,
    Reply,
    ThreadFailed,
    ToolCall,
    ToolResult,
    ToolStarted,
    args_hash,
    new_id,
    now_ms,
)
from bot.keys import Keys
from bot.outbox import Outbound, outbox_command
from bot.plan import (
    PREFETCH_PREFIX,
    Approved,
    AskAgent,
    Escalate,
    Prefetch,
    Refused,
    RunTool,
    Wait,
    gate,
    next_action,
    repeated_call,
)
from bot.redact import redact
from bot.threads import Status, Thread
from bot.tools import ToolContext

log = logging.getLogger(__name__)

# Apply commands atomically, provided the thread's log (the first argument) still ends at the given id.
Commit = Callable[[str, str, Sequence[Command]], Awaitable[list[Any]]]
# What a channel queues when an event is recorded: (outbox name, message) pairs.
Observer = Callable[[Thread, Event], Sequence[tuple[str, Outbound]]]


@dataclass
class Turn:
    """How the worker steers a thread's turn from outside. ``interrupt`` is set when a pause or cancel waits
    behind the turn: the turn stops between steps and abandons a model call in flight. ``stopping`` says the
    partition is being handed over: the turn stops between steps (a running step finishes)."""

    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: Callable[[], bool] = lambda: False
    stepping: asyncio.Future[StepOutcome] | None = None  # the agent's step in flight

    def should_stop(self) -> bool:
        return self.interrupt.is_set() or self.stopping()

    def abort(self) -> None:
        """A pause or cancel arrived: stop between steps, and abandon the step in flight."""
        self.interrupt.set()
        if self.stepping is not None:
            self.stepping.cancel()


@dataclass(frozen=True)
class Waiting:
    """The thread waits on the outside (a human, an approval, a message); the turn is over."""


@dataclass(frozen=True)
class Stopped:
    """The turn stopped between steps because the worker asked it to; the log says where to carry on."""


@dataclass(frozen=True)
class Backoff:
    """The model could not be reached; try the turn again after ``delay`` seconds."""

    delay: float


TurnOutcome = Waiting | Stopped | Backoff


@dataclass
class Tx:
    """Events and writes waiting to be committed for one thread; ``flush`` makes them durable."""

    thread: Thread
    keys: Keys
    commit: Commit
    observers: Sequence[Observer] = ()  # channels that queue messages of their own when an event is recorded
    delivered: frozenset[str] | None = None  # channel kinds someone delivers to (None: every kind)
    fresh: list[Event] = field(default_factory=list)
    extra: list[Command] = field(default_factory=list)
    records: dict[str, approvals.ApprovalRecord] = field(default_factory=dict)  # read this step, for the gate

    def add(self, event: Event, *extra: Command) -> None:
        self.thread.events.append(event)
        self.fresh.append(event)
        self.extra.extend(extra)
        for observe in self.observers:  # e.g. webhook subscribers, in the same commit that records the event
            for outbox, msg in observe(self.thread, event):
                self.extra.append(outbox_command(self.keys, msg, outbox))

    def say(self, kind: str, text: str, approval: dict[str, Any] | None = None) -> None:
        """Queue a message to the thread's humans, in the same commit as the event it reports."""
        origin = self.thread.origin
        if origin is None or (self.delivered is not None and origin.kind not in self.delivered):
            return  # nobody would ever take it from the outbox (an API caller reads the thread instead)
        msg = Outbound(
            id=self.fresh[-1].id if self.fresh else new_id(),
            thread_id=self.thread.id,
            ref=origin,
            kind=kind,  # type: ignore[arg-type]
            text=text,
            approval=approval,
        )
        self.extra.append(outbox_command(self.keys, msg))

    async def flush(self, *tail: Command) -> None:
        if not (self.fresh or self.extra or tail):
            return
        log_key = self.keys.log(self.thread.id)
        cmds: list[Command] = [("XADD", log_key, "*", "e", codec.encode(e)) for e in self.fresh]
        cmds.extend(self.extra)
        if self.fresh:
            cmds.append(("ZADD", self.keys.threads, now_ms(), self.thread.id))
        cmds.extend(tail)
        results = await self.commit(log_key, self.thread.last_id, cmds)
        if self.fresh:
            self.thread.last_id = results[len(self.fresh) - 1].decode()
        self.fresh.clear()
        self.extra.clear()


@dataclass
class Runner:
    """Drives threads forward. ``deps`` is handed to tools (see ToolContext)."""

    deps: Any
    keys: Keys

    async def accept(self, tx: Tx, event: Event) -> str | None:
        """Whether an inbound event applies to this thread; a reason when it does not (it is then dropped)."""
        thread = tx.thread
        if event.key and thread.has_key(event.key):
            return "repeat of an event already applied"
        if not thread.events:
            return None if event.type == "thread.launched" else "no such thread (launch it first)"
        if event.type == "thread.launched":
            return "thread already launched"
        if thread.status is Status.CANCELLED:
            return "thread is cancelled"
        if isinstance(event, ApprovalDecided):
            open_request = thread.open_approval()
            if open_request is None or open_request.approval_id != event.approval_id:
                return f"approval {event.approval_id} is not open on this thread"
            record = await approvals.get(self.deps.redis, self.keys, event.approval_id)
            state = "approved" if event.approved else "expired" if event.expired else "rejected"
            if record.state != state or record.by != event.by:
                return f"decision does not match the approval record ({record.state} by {record.by or '-'})"
            tx.records[record.id] = record  # the executor's gate reads it next, moments from now
        return None

    async def apply(self, tx: Tx, agent: Agent | None, event: Event, turn: Turn | None = None) -> TurnOutcome:
        """Record ``event`` (if it applies) and run the thread until it waits, or ``turn`` says stop."""
        if isinstance(event, MessageReceived) and tx.thread.events and tx.thread.status is Status.WAITING_HUMAN:
            event = answer(event)  # decided here, in order, not by the channel that saw the thread a moment ago
        why_not = await self.accept(tx, event)
        if why_not is None:
            open_request = tx.thread.open_approval()
            if event.type == "thread.cancelled" and open_request is not None:
                await self._cancel_approval(tx, event, open_request)
            elif isinstance(event, ApprovalDecided) and open_request is not None:
                self._record_decision(tx, event, open_request)
            else:
                tx.add(event)
                self._announce(tx, event)
        else:
            log.info("thread %s: ignored %s (%s): %s", tx.thread.id, event.type, event.key, why_not)
        if agent is None:
            return Waiting()
        return await self.advance(tx, agent, turn or Turn())

    async def _cancel_approval(self, tx: Tx, event: Event, request: ApprovalRequested) -> None:
        """Cancel a thread that waits for an approval: the approval is closed, unless a decision got there first
        (its event is queued behind this cancel). That is checked and done in one step in Redis, ahead of this
        commit, so a record that says "approved" is never overwritten; if this commit is lost, the cancel is
        still on the inbound stream and is applied again, finding the approval already closed by it."""
        first = await approvals.close(self.deps.redis, self.keys, request.approval_id, "cancelled")
        tx.add(event)
        self._announce(tx, event)
        if first.result != "decided" or first.state not in ("approved", "rejected"):
            return  # closed now (late deciders are told it was cancelled), or closed by something else before
        approved = first.state == "approved"
        truth = f"{first.state.capitalize()} by {first.by or '?'}, but the thread was cancelled first; nothing ran."
        tx.add(ToolResult(thread_id=tx.thread.id, call_id=request.call_id, ok=False, error=truth))
        tx.say("approval_update", truth, {"id": request.approval_id, "approved": approved, "by": first.by,
                                          "at": first.at, "feedback": "", "cancelled": True})  # fmt: skip

    def _record_decision(self, tx: Tx, event: ApprovalDecided, request: ApprovalRequested) -> None:
        tx.add(event, *approvals.settle_commands(self.keys, event.approval_id))
        self._announce(tx, event)
        if not event.approved:  # a rejection is the call's result: done for good, whatever the config says later
            if event.expired:  # not a person's no: the agent may tell the user, or ask again if it still matters
                error = f"approval expired: {event.feedback}"
            else:
                error = f"rejected by {event.by}" + (f": {event.feedback}" if event.feedback else "")
            tx.add(ToolResult(thread_id=tx.thread.id, call_id=request.call_id, ok=False, error=error))

    def _announce(self, tx: Tx, event: Event) -> None:
        if isinstance(event, ApprovalDecided):
            verdict = f"Approved by {event.by}" if event.approved else f"Rejected by {event.by}"
            if event.expired:
                verdict = "Expired"
            text = verdict + (f": {event.feedback}" if event.feedback else "")
            tx.say("approval_update", text, {"id": event.approval_id, "approved": event.approved, "by": event.by,
                                             "at": event.at, "feedback": event.feedback,
                                             "expired": event.expired})  # fmt: skip
        elif event.type == "thread.cancelled":
            tx.say("text", f"Cancelled by {event.by or 'an operator'}.")

    async def advance(self, tx: Tx, agent: Agent, turn: Turn) -> TurnOutcome:
        """Take steps until the thread waits. Each step's events are committed before the next step starts, so
        a crash loses at most the step in flight (a tool's start and result are committed around it); the caller
        commits the last step with the inbound entry's ack. The inbound event itself travels with the first step's
        commit: until then its entry is on the stream, so nothing is lost."""
        stepped = False
        while True:
            if agent.prepare is not None:  # e.g. an MCP server's tools, listed again once it said they changed
                await agent.prepare()
            action = next_action(tx.thread, agent)
            if isinstance(action, Wait):
                return Waiting()
            if turn.should_stop():
                return Stopped()
            if stepped and not isinstance(action, RunTool | Prefetch):  # a tool commits before it runs anyway
                await tx.flush()
            stepped = True
            match action:
                case RunTool():
                    await self.run_tool(tx, agent, action)
                case Prefetch():
                    await self.prefetch(tx, agent)
                case Escalate(question=question):
                    tx.add(HumanAsked(thread_id=tx.thread.id, question=question, escalation=True))
                    tx.say("question", question)
                case AskAgent():
                    outcome = await self.ask_agent(tx, agent, turn)
                    if outcome is not None:
                        return outcome

    async def run_tool(self, tx: Tx, agent: Agent, action: RunTool) -> None:
        """The executor: a call runs only if the gate read from the log lets it (a call sent for approval, on its
        approved decision bound to these exact arguments), and a completed call never again."""
        call, thread = action.call, tx.thread
        if thread.result(call.call_id) is not None:
            return
        try:
            verdict = gate(thread.events, agent, call, action.args)
            if isinstance(verdict, Refused):
                raise ApprovalRequired(call.tool, call.call_id, verdict.why)
            if isinstance(verdict, Approved):
                await approvals.check_approved(self.deps.redis, self.keys, verdict.approval_id, call.tool,
                                               action.args, record=tx.records.get(verdict.approval_id))  # fmt: skip
        except ApprovalRequired as refusal:
            log.warning("thread %s: %s", thread.id, refusal)
            tx.add(ToolResult(thread_id=thread.id, call_id=call.call_id, ok=False, error=str(refusal)))
            return
        tool = agent.tools.get(call.tool)
        if tool is None:  # renamed or removed from the config since the call was proposed
            why = f"{call.tool} is no longer one of this agent's tools; nothing ran"
            tx.add(ToolResult(thread_id=thread.id, call_id=call.call_id, ok=False, error=why))
            return
        try:
            args = tool.validate(action.args)
        except ValidationError as exc:  # before it is recorded as started: a call that never ran is no repeat
            tx.add(ToolResult(thread_id=thread.id, call_id=call.call_id, ok=False, error=_compact(exc)))
            return
        if thread.started(call.call_id) is None:
            tx.add(ToolStarted(thread_id=thread.id, call_id=call.call_id, args_hash=args_hash(call.tool, action.args)))
            await tx.flush()  # recorded before it runs
        ctx = ToolContext(thread.id, call.call_id, f"{thread.id}:{call.call_id}", thread.origin, self.deps)
        seconds = agent.timeout_for(call.tool)
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                value = await tool.fn(args, ctx)
            result = ToolResult(thread_id=thread.id, call_id=call.call_id, ok=True, result=_jsonable(value))
        except TimeoutError as exc:
            if not deadline.expired():  # the tool's own time-out, reported like any failure of the tool
                error = _failure(exc)
            else:
                log.warning("thread %s: tool %s timed out after %gs", thread.id, call.tool, seconds)
                error = f"timed out after {seconds:g} s (it may or may not have taken effect)"
            result = ToolResult(thread_id=thread.id, call_id=call.call_id, ok=False, error=error)
        except Exception as exc:  # a tool's failure is the agent's information, not the runtime's crash
            error = _failure(exc)
            log.info("thread %s: tool %s failed: %s", thread.id, call.tool, error)
            result = ToolResult(thread_id=thread.id, call_id=call.call_id, ok=False, error=error)
        tx.add(result)
        await tx.flush()  # recorded after it ran: from here on, nothing runs it again

    async def prefetch(self, tx: Tx, agent: Agent) -> None:
        for i, pre in enumerate(agent.prefetch):
            call = ToolCall(thread_id=tx.thread.id, call_id=f"{PREFETCH_PREFIX}{i}", tool=pre.tool, args=pre.args,
                            reason="pre-fetched before the first model call")  # fmt: skip
            tx.add(call)
            await self.run_tool(tx, agent, RunTool(call, pre.args, None))

    async def ask_agent(self, tx: Tx, agent: Agent, turn: Turn) -> Stopped | Backoff | None:
        """One step of the agent: the model's (or a deterministic function's) answer, validated and recorded."""
        thread = tx.thread
        try:
            outcome = await _step(agent, list(thread.events), turn)
        except ModelUnavailableError as exc:
            retry = outage.next_retry(thread.events, agent.outage, now_ms(), exc.retry_after)
            tx.add(ModelUnavailable(thread_id=thread.id, error=exc.reason, attempt=retry.attempt,
                                    retry_in_ms=int(retry.delay * 1000), notified=retry.notify))  # fmt: skip
            log.warning("thread %s: model unavailable (try %d, again in %.1fs): %s",
                        thread.id, retry.attempt, retry.delay, exc.reason)  # fmt: skip
            if retry.notify:
                tx.say("error", "The model is not answering at the moment; I keep trying and will answer as soon "
                                "as it is back. Nothing you sent is lost.")  # fmt: skip
            return Backoff(retry.delay)
        except (ModelNotConfigured, ModelRefused) as exc:
            tx.add(ThreadFailed(thread_id=thread.id, reason=str(exc)))
            tx.say("error", str(exc))
            return None
        if outcome is None:
            return Stopped()
        step, llm = outcome.step, outcome.llm
        if isinstance(step, CallTool):
            step = self._check_call(thread, agent, step)
        match step:
            case Malformed(error_kind=kind, message=message):
                tx.add(Error(thread_id=thread.id, kind=kind, message=message, llm=llm))
            case SendReply(text=text):
                tx.add(Reply(thread_id=thread.id, text=text, llm=llm))
                tx.say("text", text)
            case AskHuman(question=question):
                tx.add(HumanAsked(thread_id=thread.id, question=question, llm=llm))
                tx.say("question", question)
            case CallTool(tool=name, args=args, reason=reason, approvers=wanted):
                call = ToolCall(thread_id=thread.id, call_id=new_id(), tool=name, args=args, reason=reason, llm=llm)
                tx.add(call)
                policy = agent.gated(name)
                if policy is not None:
                    self._request_approval(tx, call, policy.narrowed(wanted), policy.expires_after)
        return None

    def _check_call(self, thread: Thread, agent: Agent, step: CallTool) -> CallTool | Malformed:
        tool = agent.tools.get(step.tool)
        if tool is None:
            return Malformed("unknown_tool", f"there is no tool {step.tool!r}; use one of {sorted(agent.tools)}")
        try:
            args = tool.validate(step.args).model_dump(mode="json")
        except ValidationError as exc:
            return Malformed("invalid_arguments", f"{step.tool}: {_compact(exc)}")
        earlier = repeated_call(thread.events, step.tool, args, repeatable=tool.repeatable)
        if earlier is not None:  # refused before any approval card: a human is never asked to run it twice
            result = thread.result(earlier.call_id)
            how = "" if result is None or result.ok else " and failed (it may still have had effects)"
            return Malformed(
                "repeated_call",
                f"{step.tool} already ran with these arguments (call {earlier.call_id}){how}; its result is above. "
                "It is not run again: use what it returned, change the arguments, or ask a human.",
            )
        return CallTool(step.tool, args, step.reason, step.approvers)

    def _request_approval(self, tx: Tx, call: ToolCall, approvers: Sequence[str], expires_after: float) -> None:
        at = now_ms()
        req = ApprovalRequested(
            at=at,
            expires_at=at + int(expires_after * 1000),
            thread_id=tx.thread.id,
            approval_id=call.call_id,
            call_id=call.call_id,
            tool=call.tool,
            args=call.args,
            args_hash=args_hash(call.tool, call.args),
            approvers=list(approvers),
            reason=call.reason,
        )
        tx.add(req, *approvals.request_commands(self.keys, req))
        shown = "\n".join(f"  {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in call.args.items())
        tx.say(
            "approval_request",
            f"Approval needed to run {call.tool}:\n{shown}" + (f"\nWhy: {call.reason}" if call.reason else ""),
            {"id": req.approval_id, "tool": req.tool, "args": req.args, "approvers": req.approvers,
             "reason": req.reason},
        )  # fmt: skip


async def _step(agent: Agent, events: list[Event], turn: Turn) -> StepOutcome | None:
    """The agent's step within its timeout; None if ``turn`` was interrupted first (the answer is abandoned)."""
    if turn.interrupt.is_set():
        return None
    if getattr(agent.step, "instant", False):  # plain code: nothing to time out or abandon, no task needed
        return await agent.step(events)
    step = turn.stepping = asyncio.ensure_future(agent.step(events))
    deadline = asyncio.timeout(agent.step_timeout)
    try:
        async with deadline:
            return await step
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if step.cancelled() and turn.interrupt.is_set() and not (current and current.cancelling()):
            return None  # Turn.abort cancelled the step; nobody cancelled us
        raise
    except TimeoutError:
        if not deadline.expired():
            raise  # the step's own time-out: a failure like any other
        raise ModelUnavailableError(f"no answer within {agent.step_timeout:g} s") from None
    finally:
        turn.stepping = None


def _failure(exc: BaseException) -> str:
    """A tool's exception as stored, shown to the model and sent to webhooks: credentials redacted (HTTP clients
    put the URL they called, tokens and all, in their errors)."""
    return redact(f"{type(exc).__name__}: {exc}")


def answer(message: MessageReceived) -> HumanAnswered:
    """A message to a thread that waits on a human is that human's answer."""
    return HumanAnswered(id=message.id, thread_id=message.thread_id, at=message.at, key=message.key, ref=message.ref,
                         text=message.text, by=message.user)  # fmt: skip


def _compact(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))
