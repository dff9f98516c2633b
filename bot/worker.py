"""Workers: each owns some inbound partitions (a lease with a fencing token) and advances their threads.

The partition is the unit of ownership, not of work. An owner reads its partition's stream in order and hands each
entry to its thread's lane: one serial queue per thread, so a thread's events apply strictly in order while many
threads advance side by side, and a slow model call or tool holds up only its own thread.

An inbound stream holds exactly the entries not yet applied: an entry is deleted (XDEL) in the same fenced commit
that records its effects. So the pending entries belong to the partition, not to a process: a new owner reads the
stream from the start, and nothing can sit unseen in a departed consumer's pending list.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import channel, codec, threads
from bot.bus import Command
from bot.connections import server_time_ms
from bot.errors import LeaseLost, LogConflict
from bot.events import Event
from bot.llm import LLMStep, load_litellm
from bot.loop import Backoff, Runner, Stopped, Turn, TurnOutcome, Tx, Waiting
from bot.runtime import Deps, check_installation

log = logging.getLogger(__name__)

# Take a free lease with a new fencing token. A retried call (its reply lost) finds its own lease and returns it.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then return held end
  return false
end
local token = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Fenced, and once only: the entry leaves its stream and enters the dead-letter stream in one step; a retry of a
# call whose reply was lost finds the entry gone and writes nothing. KEYS: lease, stream, dlq, attempts.
_MOVE_TO_DLQ = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'LEASELOST' end
if redis.call('XDEL', KEYS[2], ARGV[2]) == 0 then return 'GONE' end
redis.call('XADD', KEYS[3], '*', 'stream', KEYS[2], 'field', 'e', 'payload', ARGV[3], 'error', ARGV[4],
           'entry', ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
return 'MOVED'
"""

# Thread logs kept in memory per worker, each valid only under the lease it was read with. Small on purpose:
# every cached event is a few Python objects, and a large cache makes full garbage collections stall the loop.
CACHE_THREADS = 512
CONTROL = frozenset({"thread.paused", "thread.cancelled"})  # these stop a turn in progress
READ_BLOCK_MS = 250  # how long one read waits for new entries (and so how soon a partition just taken is read)


@dataclass
class Item:
    """One inbound entry, waiting in its thread's lane."""

    p: int
    token: str
    entry_id: bytes
    event: Event
    raw: bytes  # the entry as published, for the dead-letter stream


@dataclass(frozen=True)
class _Done:
    """The entry is applied and acknowledged."""


@dataclass(frozen=True)
class _Again:
    """Try the same entry again after ``delay`` seconds. ``carried``: its effects are recorded and only the turn
    is left to finish (the model was away), so a newer entry of the thread may carry the turn on instead."""

    delay: float
    carried: bool = False


@dataclass(frozen=True)
class _Leave:
    """The partition is going away from this worker; leave the entry in the stream for the next owner."""


_Result = _Done | _Again | _Leave


@dataclass
class Lane:
    """A thread's serial queue inside a worker."""

    thread_id: str
    items: deque[Item] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    turn: Turn = field(default_factory=Turn)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # something new: wakes a lane that waits

    def refresh_interrupt(self) -> None:
        """A turn is interrupted while a pause or cancel waits behind the entry in hand."""
        if any(i.event.type in CONTROL for i in list(self.items)[1:]):
            self.turn.interrupt.set()
        else:
            self.turn.interrupt.clear()


class Worker:
    def __init__(
        self,
        deps: Deps,
        worker_id: str | None = None,
        *,
        batch: int = 100,
        max_queued: int = 5000,
        concurrency: int = 1000,
        drain_seconds: float | None = None,
    ) -> None:
        self.deps, self.keys, self.redis = deps, deps.keys, deps.redis
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{random.randrange(1 << 20):x}"
        self.batch, self.max_queued = batch, max_queued
        self.runner = Runner(deps, deps.keys)
        self.observers, self.delivered = channel.observers(deps), channel.delivered()
        self.lease_ms = deps.settings.lease_ms
        self.drain_seconds = deps.settings.drain_seconds if drain_seconds is None else drain_seconds
        self.owned: dict[int, str] = {}  # partition -> fencing token
        self.draining: set[int] = set()  # owned, being handed over: no new reads, running steps finish
        self.reader: asyncio.Task[None] | None = None  # one blocking read over every partition owned
        self.cursors: dict[int, str] = {}  # the last entry id read per partition
        self._partitions = {self.keys.inbound(p).encode(): p for p in range(self.keys.partitions)}
        self.known: dict[int, set[bytes]] = {}  # entry ids of a partition waiting in lanes or being applied
        self.finished: dict[int, dict[bytes, float]] = {}  # recently applied ids (so a sweep does not re-add them)
        self.lanes: dict[str, Lane] = {}
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.slots = asyncio.Semaphore(concurrency)  # turns in progress at once
        self.hand_offs: set[asyncio.Task[None]] = set()
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._move_to_dlq = self.redis.register_script(_MOVE_TO_DLQ)
        self.processed = 0
        self.cache: OrderedDict[str, tuple[str, threads.Thread]] = OrderedDict()  # thread id -> (lease, log)

    # -- membership ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("worker %s started", self.id)
        if any(isinstance(a.step, LLMStep) for a in self.deps.agents.agents.values()):
            # litellm takes seconds to import; doing it on the first model call would stall lease renewals
            await asyncio.to_thread(load_litellm)
        # What start-up built (modules, litellm's tables, the config) lives as long as the process: keep it out of
        # the garbage collector's full passes, which otherwise stop the event loop for a tenth of a second.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)  # young collections less often: each turn allocates a lot that dies young
        try:
            while not stop.is_set():
                try:
                    await self.rebalance()
                except (RedisError, OSError) as exc:  # Redis restarting or unreachable: keep trying
                    log.warning("worker %s: cannot reach Redis (%s); retrying", self.id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)
        finally:
            await self.shutdown()

    async def _now_ms(self) -> int:
        """Redis's clock: every worker measures liveness against the same one."""
        return await server_time_ms(self.redis)

    async def rebalance(self) -> None:
        """Heartbeat, keep my leases alive, hold a fair share of the partitions, and sweep for strays."""
        await check_installation(self.deps)  # settings still agree (and are recorded again after an empty restart)
        now = await self._now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {self.id: now})
        pipe.zremrangebyscore(self.keys.workers, 0, now - 3 * self.lease_ms)
        pipe.zcount(self.keys.workers, now - self.lease_ms, "+inf")
        _, _, live = await pipe.execute()
        await self._renew_all()
        share = math.ceil(self.keys.partitions / max(int(live), 1))
        active = [p for p in self.owned if p not in self.draining]
        for p in active[share:]:
            self._hand_off(p)
        active = active[:share]
        free = [p for p in range(self.keys.partitions) if p not in self.owned]
        random.shuffle(free)
        for p in free:
            if len(active) >= share:
                break
            token = await self._acquire(keys=[self.keys.lease(p), self.keys.fence(p)], args=[self.id, self.lease_ms])
            if token:
                self._take(p, token.decode())
                active.append(p)
        self._ensure_reader()  # not started, or stopped on an error: start it again
        for p in active:
            await self._sweep(p)

    async def _renew_all(self) -> None:
        for p, token in list(self.owned.items()):
            if not await self._renew(keys=[self.keys.lease(p)], args=[token, self.lease_ms]):
                log.warning("worker %s lost partition %d", self.id, p)
                self._lost(p, token)

    def _take(self, p: int, token: str) -> None:
        self.owned[p] = token
        self.known[p], self.finished[p], self.cursors[p] = set(), {}, "0-0"
        self._ensure_reader()

    def _ensure_reader(self) -> None:
        """Start the reader unless it runs; a running one reads a partition just taken from its next call on
        (its blocking call is short for that reason: cancelling it would cost its connection)."""
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read(), name=f"reader-{self.id}")

    def _forget(self, p: int) -> None:
        """Drop what this worker holds of partition ``p``; its entries stay in the stream for the next owner."""
        self.owned.pop(p, None)
        self.draining.discard(p)
        for lane in list(self.lanes.values()):
            kept = deque(i for i in lane.items if i.p != p)
            self.queued -= len(lane.items) - len(kept)
            lane.items = kept
            lane.arrived.set()
        self.known.pop(p, None)
        self.finished.pop(p, None)
        self._check_room()

    def _lost(self, p: int, token: str) -> None:
        """Another worker holds the partition now: stop its lanes at once (only real lease loss cancels work)."""
        if self.owned.get(p) != token:
            return
        me = asyncio.current_task()
        for lane in self.lanes.values():
            if lane.task and lane.task is not me and lane.items and lane.items[0].p == p:
                lane.task.cancel()
        self._forget(p)

    def _hand_off(self, p: int) -> None:
        """Give a partition up gracefully: stop reading, let running steps finish, then release the lease."""
        if p in self.draining or p not in self.owned:
            return
        self.draining.add(p)
        task = asyncio.create_task(self._drain(p, self.owned[p]), name=f"hand-off-{p}")
        self.hand_offs.add(task)
        task.add_done_callback(self.hand_offs.discard)

    async def _drain(self, p: int, token: str) -> None:
        busy = [lane.task for lane in self.lanes.values() if lane.task and lane.items and lane.items[0].p == p]
        for lane in self.lanes.values():
            lane.arrived.set()  # lanes waiting out a backoff notice the hand-over now
        if busy:
            _, late = await asyncio.wait(busy, timeout=self.drain_seconds)
            if late:
                log.warning("worker %s: %d turns of partition %d outran the drain deadline (%gs); cancelled",
                            self.id, len(late), p, self.drain_seconds)  # fmt: skip
                await _stopped(list(late))
        if self.owned.get(p) == token:
            self._forget(p)
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=[self.keys.lease(p)], args=[token])

    async def shutdown(self) -> None:
        """Drain every partition (running steps finish within the deadline), keeping the leases alive meanwhile,
        then release them: a tool cut off by a deploy would otherwise run again on the next owner."""
        for p in list(self.owned):
            self._hand_off(p)

        async def keep_leases() -> None:
            while True:
                await asyncio.sleep(self.lease_ms / 3000)
                with contextlib.suppress(RedisError, OSError):
                    await self._renew_all()

        renewing = asyncio.create_task(keep_leases())
        try:
            while self.hand_offs:
                await asyncio.gather(*list(self.hand_offs), return_exceptions=True)
        finally:
            await _stopped([renewing])
        await _stopped([t for t in (self.reader,) if t is not None])
        await _stopped([lane.task for lane in self.lanes.values() if lane.task])
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(self.keys.workers, self.id)

    # -- reading a partition ------------------------------------------------------------------------------

    async def _read(self) -> None:
        """Read every owned partition in one blocking call and hand each entry to its thread's lane."""
        try:
            while True:
                streams = {self.keys.inbound(p): self.cursors[p] for p in self.owned if p not in self.draining}
                if not streams:
                    return  # started again when a partition is taken
                if self.queued >= self.max_queued:
                    await self.room.wait()  # lanes are full: let them catch up before reading more
                    continue
                got = await self.redis.xread(streams, count=self.batch, block=READ_BLOCK_MS)
                for name, entries in got:
                    p = self._partitions[name]
                    token = self.owned.get(p)
                    if token is None or p in self.draining:
                        continue  # let go of while we read: its entries stay for the next owner
                    for entry_id, fields in entries:
                        self.cursors[p] = entry_id.decode()
                        await self._dispatch(p, token, self.keys.inbound(p), entry_id, fields)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("worker %s: reading stopped (%s); starting again", self.id, exc)
        except Exception:
            log.exception("worker %s: reading stopped", self.id)

    async def _dispatch(self, p: int, token: str, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        known = self.known.get(p)
        if known is None or entry_id in known or entry_id in self.finished.get(p, {}):
            return
        try:
            event = codec.decode(fields[b"e"])
        except Exception as exc:
            try:
                await self._dead_letter(p, token, stream, entry_id, fields, f"undecodable entry: {exc}")
            except LeaseLost:
                self._lost(p, token)
            return
        known.add(entry_id)
        lane = self.lanes.get(event.thread_id)
        if lane is None:
            lane = self.lanes[event.thread_id] = Lane(event.thread_id)
        lane.items.append(Item(p, token, entry_id, event, fields[b"e"]))
        self.queued += 1
        self._check_room()
        lane.arrived.set()
        if event.type in CONTROL and len(lane.items) > 1:
            lane.turn.abort()
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"thread-{lane.thread_id}")

    async def _sweep(self, p: int) -> None:
        """Entries already read but held by no lane (a lane that failed unexpectedly) are taken up again."""
        token, known = self.owned.get(p), self.known.get(p)
        if token is None or known is None:
            return
        horizon = time.monotonic() - 10  # a sweep's read is seconds old at most
        finished = self.finished.get(p, {})
        for entry_id in [i for i, at in finished.items() if at < horizon]:
            del finished[entry_id]
        stream = self.keys.inbound(p)
        rows = await self.redis.xrange(stream, "-", self.cursors.get(p, "0-0"), count=self.batch)
        for entry_id, fields in rows:
            if entry_id not in known and entry_id not in finished and self.owned.get(p) == token:
                log.warning("worker %s: partition %d: entry %s was held by nobody; applying it now",
                            self.id, p, entry_id.decode())  # fmt: skip
                await self._dispatch(p, token, stream, entry_id, fields)

    def _check_room(self) -> None:
        if self.queued < self.max_queued:
            self.room.set()
        else:
            self.room.clear()

    # -- one thread's lane --------------------------------------------------------------------------------

    async def _run_lane(self, lane: Lane) -> None:
        try:
            while lane.items:
                item = lane.items[0]
                if self.owned.get(item.p) != item.token or item.p in self.draining:
                    self._forget_items(lane, item.p)
                    continue
                lane.arrived.clear()
                lane.refresh_interrupt()
                async with self.slots:
                    result = await self._process(lane, item)
                if isinstance(result, _Done):
                    self._finish(lane, item)
                elif isinstance(result, _Leave):
                    self._forget_items(lane, item.p)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.arrived.wait(), result.delay)
                    if result.carried and lane.arrived.is_set() and len(lane.items) > 1 and lane.items[0] is item:
                        # something newer came for this thread: it carries the turn on, so this entry is done
                        await self._ack_only(item)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not lose entries: they stay in the stream and the sweep finds them
            log.exception("worker %s: thread %s stopped unexpectedly", self.id, lane.thread_id)
            for item in lane.items:
                self.known.get(item.p, set()).discard(item.entry_id)
            self.queued -= len(lane.items)
            lane.items.clear()
            self._check_room()
        finally:
            lane.task = None
            if not lane.items and self.lanes.get(lane.thread_id) is lane:
                del self.lanes[lane.thread_id]

    def _finish(self, lane: Lane, item: Item) -> None:
        if lane.items and lane.items[0] is item:
            lane.items.popleft()
            self.queued -= 1
            self._check_room()
        self.known.get(item.p, set()).discard(item.entry_id)
        finished = self.finished.get(item.p)
        if finished is not None:
            finished[item.entry_id] = time.monotonic()
        self.processed += 1

    def _forget_items(self, lane: Lane, p: int) -> None:
        kept = deque(i for i in lane.items if i.p != p)
        for i in lane.items:
            if i.p == p:
                self.known.get(p, set()).discard(i.entry_id)
        self.queued -= len(lane.items) - len(kept)
        lane.items = kept
        self._check_room()

    async def _ack_only(self, item: Item) -> None:
        with contextlib.suppress(LeaseLost, RedisError, OSError):  # else the entry is applied again, harmlessly
            await self.deps.bus.fenced(self.keys.lease(item.p), item.token, self._ack(item))
            lane = self.lanes.get(item.event.thread_id)
            if lane is not None:
                self._finish(lane, item)

    def _ack(self, item: Item) -> list[Command]:
        return [("XDEL", self.keys.inbound(item.p), item.entry_id), ("HDEL", self._attempts(item.p), item.entry_id)]

    def _attempts(self, p: int) -> str:
        return f"{self.keys.ns}:attempts:{p}"  # per partition: stream ids repeat across partitions

    async def _process(self, lane: Lane, item: Item) -> _Result:
        p, token, event = item.p, item.token, item.event
        try:
            outcome = await self.apply(p, token, event, self._ack(item), lane)
        except LeaseLost:
            self._lost(p, token)
            return _Leave()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.cache.pop(event.thread_id, None)
            log.warning("thread %s: Redis is unreachable (%s); trying again", event.thread_id, exc)
            return _Again(1.0)  # not this entry's fault: not counted as a failure
        except LogConflict:
            self.cache.pop(event.thread_id, None)  # our view of the log is stale; reload it and go again
            return _Again(0)
        except Exception as exc:
            self.cache.pop(event.thread_id, None)  # what is in memory may include uncommitted events
            return await self._failed(item, exc)
        if isinstance(outcome, Backoff):
            return _Again(outcome.delay, carried=True)
        if isinstance(outcome, Stopped) and not lane.turn.interrupt.is_set():
            return _Leave()  # the partition is being handed over; the next owner carries on from the log
        return _Done()

    async def _failed(self, item: Item, exc: Exception) -> _Result:
        event = item.event
        try:
            attempts = await self.redis.hincrby(self._attempts(item.p), item.entry_id, 1)
        except (RedisError, OSError):
            return _Again(1.0)
        log.exception("thread %s: event %s failed (attempt %d)", event.thread_id, event.type, attempts,
                      exc_info=exc)  # fmt: skip
        if attempts < self.deps.settings.max_deliveries:
            return _Again(min(0.1 * 2**attempts, 5.0))
        stream = self.keys.inbound(item.p)
        try:
            await self._dead_letter(item.p, item.token, stream, item.entry_id, {b"e": item.raw},
                                    f"{type(exc).__name__}: {exc}")  # fmt: skip
        except LeaseLost:
            self._lost(item.p, item.token)
            return _Leave()
        except (RedisError, OSError):
            return _Again(1.0)
        return _Done()

    async def apply(
        self, p: int, token: str, event: Event, ack: Sequence[Command], lane: Lane | None = None
    ) -> TurnOutcome:
        """Apply one inbound event to its thread and run the thread's turn; commit with ``ack`` when the entry is
        done with: the thread waits, or a later entry of the same thread (queued in ``lane``) carries on."""
        cached = self.cache.get(event.thread_id)
        if cached is not None and cached[0] == token:
            thread = cached[1]
        else:  # never read, evicted, or read under an earlier lease (someone else may have written since)
            thread = await threads.load(self.redis, self.keys, event.thread_id)
        self.cache[event.thread_id] = (token, thread)
        self.cache.move_to_end(event.thread_id)
        if len(self.cache) > CACHE_THREADS:
            self.cache.popitem(last=False)

        async def commit(log: str, last_id: str, cmds: Sequence[Command]) -> list[Any]:
            return await self.deps.bus.fenced(self.keys.lease(p), token, cmds, log=log, last_id=last_id)

        tx = Tx(thread, self.keys, commit, self.observers, self.delivered)
        name = event.agent if event.type == "thread.launched" else thread.agent
        agent = self.deps.agents.agents.get(name)
        if agent is None and name:
            log.error("thread %s: agent %r is not configured; recording the event only", thread.id, name)
        turn = lane.turn if lane is not None else Turn()
        turn.stopping = lambda: self.owned.get(p) != token or p in self.draining
        outcome = await self.runner.apply(tx, agent, event, turn)
        later = lane is not None and len(lane.items) > 1
        if isinstance(outcome, Waiting) or (isinstance(outcome, Stopped | Backoff) and later and
                                            (turn.interrupt.is_set() or isinstance(outcome, Backoff))):  # fmt: skip
            await tx.flush(*ack)
            return Waiting() if isinstance(outcome, Backoff) else outcome
        await tx.flush()  # the entry stays: it is what makes the thread carry on (after a backoff, or elsewhere)
        return outcome

    async def _dead_letter(
        self, p: int, token: str, stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None, error: str
    ) -> None:
        """Move an entry to the dead-letter stream, once: a retried call (its reply lost) finds it gone."""
        payload = (fields or {}).get(b"e", b"")
        moved = await self._move_to_dlq(
            keys=[self.keys.lease(p), stream, self.keys.dlq, self._attempts(p)],
            args=[token, entry_id, payload, error],
        )
        if moved == b"LEASELOST":
            raise LeaseLost(self.keys.lease(p))
        log.error("dead-lettered %s from %s: %s", entry_id.decode(), stream, error)


async def _stopped(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait for them to end, cancelling again if one swallowed it (redis-py can, mid-reconnect)."""
    while tasks:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        tasks = list(pending)
