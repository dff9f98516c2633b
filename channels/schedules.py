"""Schedules: cron expressions in a time zone that launch agent threads, each scheduled time once across replicas.

Exactly-once needs no lock of its own. A fire is ``control.launch`` with an idempotency key made of the schedule's
name and the scheduled time (UTC epoch seconds) and a thread id made of the same, and the bus accepts a key once,
atomically with the XADD: that de-duplication *is* the lock, keyed on the scheduled time rather than on anyone's
clock. Every replica may compute and fire the same time; exactly one launch gets onto the stream.

What a replica keeps in Redis is only how far it has looked (``last``, advanced monotonically). A time that passes
while no scheduler runs is found the next time one does, and the schedule's ``catch_up`` policy decides about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter
from redis.exceptions import RedisError

from bot import control
from bot.channel import BaseChannel, Role, Runner
from bot.config import ScheduleSpec
from bot.connections import server_time_ms
from bot.errors import HandrailError
from bot.events import ChannelRef, new_id
from bot.keys import Keys
from bot.runtime import Deps

log = logging.getLogger(__name__)

# A scheduled time at most this old when a tick sees it is on time (a slow tick, a short Redis blip); older
# ones were missed while no scheduler ran, and the schedule's catch_up policy applies to them.
GRACE = timedelta(seconds=60)
_LOGGED_SKIPS = 20  # after a long outage, name this many skipped times and count the rest
_MAX_BACKOFF = 10.0  # seconds; well inside GRACE, so a Redis blip does not turn on-time fires into missed ones

# Advance what a schedule has looked at, and what it last fired, only ever forwards: replicas race.
# KEYS: last, fired. ARGV: looked up to ('' to leave), fired at ('' for none), fired thread.
_RECORD = """
if ARGV[1] ~= '' and tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '-1') then
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[2], 'at') or '-1') then
  redis.call('HSET', KEYS[2], 'at', ARGV[2], 'thread', ARGV[3])
end
return redis.call('GET', KEYS[1])
"""


def last_key(keys: Keys, name: str) -> str:
    """Epoch seconds up to which the schedule's times have been handled. Hash tag: one slot per schedule."""
    return f"{keys.ns}:{{sched:{name}}}:last"


def fired_key(keys: Keys, name: str) -> str:
    return f"{keys.ns}:{{sched:{name}}}:fired"


# -- when -------------------------------------------------------------------------------------------------------


def _every_hour(cron: str) -> bool:
    hours = croniter(cron).expanded[1]
    return hours == ["*"] or len(set(hours)) == 24


def _second_occurrence(local: datetime) -> bool:
    """Whether this is the repeat of a wall-clock time that happens twice (the hour clocks go back)."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _fires(spec: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    """Scheduled times strictly after ``after``, in order, as aware datetimes in the schedule's zone.

    croniter walks the calendar in local time. Around DST changes, like Vixie cron: a fixed time in the hour that
    does not exist (02:30 on the spring day) fires once, when clocks jump (03:00); croniter does that. A fixed
    time in the hour that happens twice fires once, at its first occurrence; croniter yields both, so the repeat
    is dropped here. A schedule that runs every hour keeps doing so through both copies of the repeated hour.
    """
    if after.tzinfo is None:
        raise ValueError("schedule times need a time zone: pass an aware datetime")
    tz = ZoneInfo(spec.timezone)
    hourly = _every_hour(spec.cron)
    it = croniter(spec.cron, after.astimezone(tz))
    # Compare in UTC: datetimes sharing one tzinfo compare by wall time, blind to which 02:30 is which.
    prev, stale = after.astimezone(UTC), 0
    while True:
        try:
            moment = it.get_next(datetime).astimezone(UTC)
        except CroniterBadDateError:
            return  # a valid cron with no date left to match (e.g. "0 9 30 2 *"): it simply never fires
        local = moment.astimezone(tz)  # from UTC, so fold says which occurrence of a repeated time it is
        if moment <= prev or (not hourly and _second_occurrence(local)):
            stale += 1
            if stale > 1000:  # croniter stuck on one time: fail loudly rather than spin
                raise RuntimeError(f"cron {spec.cron!r} in {spec.timezone} does not advance past {local}")
            continue
        stale, prev = 0, moment
        yield local


def next_fires(spec: ScheduleSpec, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` scheduled times strictly after ``after`` (aware, in the schedule's time zone); fewer
    only for a cron that matches no date in croniter's search range."""
    return list(itertools.islice(_fires(spec, after), count))


def _fires_between(spec: ScheduleSpec, after: datetime, until: datetime) -> list[datetime]:
    """Scheduled times in (after, until]."""
    out: list[datetime] = []
    until = until.astimezone(UTC)
    for t in _fires(spec, after):
        if t.astimezone(UTC) > until:
            return out
        out.append(t)
    return out


# -- firing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fired:
    schedule: str
    at: datetime  # the scheduled time, in the schedule's zone (a manual run: when it was asked for)
    thread_id: str
    late: bool = False  # a catch-up run for times missed while no scheduler ran
    duplicate: bool = False  # another replica had already put it on the stream


def _ref(name: str, spec: ScheduleSpec) -> ChannelRef:
    ch = spec.channel
    return ChannelRef(kind=ch.kind, address=ch.address, user=ch.user or f"schedule:{name}")


async def _record(deps: Deps, name: str, *, looked: datetime | None, fired: Fired | None) -> None:
    await deps.redis.register_script(_RECORD)(
        keys=[last_key(deps.keys, name), fired_key(deps.keys, name)],
        args=[f"{looked.timestamp():.3f}" if looked else "", f"{fired.at.timestamp():.3f}" if fired else "",
              fired.thread_id if fired else ""],
    )  # fmt: skip


async def _fire(deps: Deps, name: str, spec: ScheduleSpec, at: datetime, *, late: bool) -> Fired:
    epoch = int(at.timestamp())
    accepted = await control.launch(
        deps, spec.agent, spec.message, _ref(name, spec), thread_id=f"sched-{name}-{epoch}",
        key=f"schedule:{name}:{epoch}",
    )  # fmt: skip
    if not accepted.duplicate:
        what = "catch-up run" if late else "fired"
        log.info("schedule %s %s for %s: thread %s", name, what, at.isoformat(), accepted.thread_id)
    return Fired(name, at, accepted.thread_id, late=late, duplicate=accepted.duplicate)


async def _tick_one(deps: Deps, name: str, spec: ScheduleSpec, now: datetime, grace: timedelta) -> list[Fired]:
    key = last_key(deps.keys, name)
    raw = await deps.redis.get(key)
    if raw is None:
        # The first look at this schedule: start from now. Times before it were no scheduler's to fire.
        if await deps.redis.set(key, f"{now.timestamp():.3f}", nx=True):
            log.info("schedule %s: first look, at %s; times from now on fire", name, now.isoformat())
            return []
        raw = await deps.redis.get(key)  # another replica started it first
    last = datetime.fromtimestamp(float(raw), UTC)
    if last >= now:
        return []  # a replica with a later clock already looked this far
    due = _fires_between(spec, last, now)
    missed = [t for t in due if now - t > grace]
    chosen = [t for t in due if now - t <= grace]
    if missed and spec.catch_up == "run_once":
        log.warning("schedule %s missed %d time(s) from %s to %s; running once for %s", name, len(missed),
                    missed[0].isoformat(), missed[-1].isoformat(), missed[-1].isoformat())  # fmt: skip
        chosen.insert(0, missed[-1])
    elif missed:
        for t in missed[:_LOGGED_SKIPS]:
            log.warning("schedule %s skipped %s: no scheduler ran then (catch_up: skip)", name, t.isoformat())
        if len(missed) > _LOGGED_SKIPS:
            log.warning("schedule %s skipped %d more time(s) up to %s", name, len(missed) - _LOGGED_SKIPS,
                        missed[-1].isoformat())  # fmt: skip
    # Fire first, then advance: a replica that dies in between leaves the times to the next tick, and the
    # bus turns that second launch into a no-op. Advancing first could lose a fire.
    fired = [await _fire(deps, name, spec, t, late=now - t > grace) for t in chosen]
    await _record(deps, name, looked=now, fired=fired[-1] if fired else None)
    return fired


async def tick(deps: Deps, now: datetime, *, grace: timedelta = GRACE) -> list[Fired]:
    """One pass over the configured schedules: fire what is due in (last, now], per the catch-up policy."""
    if now.tzinfo is None:
        raise ValueError("tick needs an aware 'now'")
    now = now.astimezone(UTC)  # arithmetic between datetimes of one zone is wall-clock arithmetic: avoid it
    schedules = deps.agents.spec.schedules
    results = await asyncio.gather(
        *(_tick_one(deps, name, spec, now, grace) for name, spec in schedules.items()), return_exceptions=True
    )
    fired: list[Fired] = []
    errors: list[Exception] = []
    for name, result in zip(schedules, results, strict=True):
        if isinstance(result, Exception):
            log.error("schedule %s: %s: %s", name, type(result).__name__, result)
            errors.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            fired.extend(result)
    if errors:  # one schedule's failure did not hold up the others; the caller still hears of it
        raise errors[0]
    return fired


async def run_scheduler(
    deps: Deps, stop: asyncio.Event, *, interval: float = 1.0, clock: Callable[[], datetime] | None = None
) -> None:
    """Tick until ``stop`` is set. Errors are logged and retried: a scheduler outlives Redis restarts.

    "Now" is Redis's clock unless ``clock`` is given: replicas on machines whose clocks disagree still agree on
    what is due, so none fires early and makes the others skip.
    """
    names = list(deps.agents.spec.schedules)
    if not names:
        log.info("no schedules configured; the scheduler idles")
        await stop.wait()
        return
    log.info("scheduler running %d schedule(s): %s", len(names), ", ".join(names))
    failures = 0
    while not stop.is_set():
        try:
            await tick(deps, clock() if clock else await redis_now(deps))
            failures = 0
        except (RedisError, OSError) as exc:
            failures += 1
            log.warning("scheduler cannot reach Redis (%s); retrying", exc)
        except Exception:
            failures += 1
            log.exception("scheduler tick failed; retrying")
        delay = min(interval * 2 ** min(failures, 6), max(interval, _MAX_BACKOFF)) if failures else interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def redis_now(deps: Deps) -> datetime:
    """Redis's clock, the one every replica shares."""
    return datetime.fromtimestamp(await server_time_ms(deps.redis) / 1000, UTC)


def _spec(deps: Deps, name: str) -> ScheduleSpec:
    schedules = deps.agents.spec.schedules
    if name not in schedules:
        known = ", ".join(schedules) or f"none are configured in {deps.agents.path}"
        raise HandrailError(f"no schedule named {name!r} (schedules: {known})")
    return schedules[name]


async def fire_now(deps: Deps, name: str) -> control.Accepted:
    """Run a schedule once, now, outside its timetable (``handrail schedules run NAME``); its own thread."""
    spec = _spec(deps, name)
    run = new_id()
    accepted = await control.launch(
        deps, spec.agent, spec.message, _ref(name, spec), thread_id=f"sched-{name}-run-{run}",
        key=f"schedule:{name}:run:{run}",
    )  # fmt: skip
    fired = Fired(name, (await redis_now(deps)).astimezone(ZoneInfo(spec.timezone)), accepted.thread_id)
    await _record(deps, name, looked=None, fired=fired)
    return accepted


# -- describing ----------------------------------------------------------------------------------------------


def _when(t: datetime) -> str:
    fmt = "%Y-%m-%d %H:%M:%S" if t.second else "%Y-%m-%d %H:%M"
    return f"{t.strftime(fmt)} {t.tzname()} ({t.astimezone(UTC).strftime(fmt)} UTC)"


@dataclass(frozen=True)
class ScheduleRow:
    name: str
    spec: ScheduleSpec
    next: list[datetime]  # in the schedule's zone
    last_fired: datetime | None  # a scheduled time, or when a manual run was asked for
    last_thread: str

    def lines(self) -> list[str]:
        s, ch = self.spec, self.spec.channel
        where = ch.kind + (f":{ch.address}" if ch.address else "")
        head = f'{self.name}  "{s.cron}" {s.timezone}  agent {s.agent}  catch-up {s.catch_up}  on {where}'
        last = f"{_when(self.last_fired)}  thread {self.last_thread}" if self.last_fired else "never"
        return [head, *(f"  next  {_when(t)}" for t in self.next), f"  last fired  {last}"]


async def describe(deps: Deps, now: datetime, *, count: int = 3) -> list[ScheduleRow]:
    """Every configured schedule with its next ``count`` times after ``now`` and its last fire."""
    rows: list[ScheduleRow] = []
    for name, spec in deps.agents.spec.schedules.items():
        record = await deps.redis.hgetall(fired_key(deps.keys, name))
        at = datetime.fromtimestamp(float(record[b"at"]), ZoneInfo(spec.timezone)) if b"at" in record else None
        rows.append(ScheduleRow(name, spec, next_fires(spec, now, count), at, record.get(b"thread", b"").decode()))
    return rows


__all__ = ["GRACE", "Fired", "ScheduleRow", "describe", "fire_now", "next_fires", "run_scheduler", "tick"]


class ScheduleChannel(BaseChannel):
    """Threads launched on a schedule (cron); they talk to humans through the channel each schedule names."""

    name = "schedule"
    delivers = False

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        return [lambda stop: run_scheduler(deps, stop)] if role == "scheduler" else []


channel = ScheduleChannel()
