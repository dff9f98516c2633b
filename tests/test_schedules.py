"""Schedules: each scheduled time fires once across replicas, missed times follow catch_up, DST is sensible.

``tick`` is driven with an injected ``now`` against the real Redis: no test sleeps through real minutes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from bot import codec, threads
from bot.config import Config, ScheduleSpec, load_config
from bot.errors import ConfigError
from bot.events import ChannelRef, Event, MessageReceived, Reply, ThreadLaunched
from bot.outbox import Outbound
from bot.runtime import Deps, open_deps
from bot.settings import Settings
from bot.threads import Status
from channels import schedules
from channels.schedules import Fired, last_key, next_fires, tick
from tests.conftest import ROOT, status_is, wait_for
from tests.test_cli import failed_cleanly, handrail, run_cli, succeeded

Env = Callable[..., dict[str, str]]
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*parts: Any) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def spec(cron: str, tz: str = "UTC", catch_up: Literal["skip", "run_once"] = "skip") -> ScheduleSpec:
    return ScheduleSpec(cron=cron, timezone=tz, agent="refund-desk", message="Morning check", catch_up=catch_up)


def with_schedules(deps: Deps, **specs: ScheduleSpec) -> Deps:
    """The same Redis and agents, with only these schedules configured."""
    config = deps.agents
    return replace(deps, config=Config(config.path, config.spec.model_copy(update={"schedules": specs}), config.agents))


async def inbound(deps: Deps) -> list[Event]:
    """Everything on the inbound streams, all partitions."""
    rows = [await deps.redis.xrange(deps.keys.inbound(p)) for p in range(deps.keys.partitions)]
    return [codec.decode(fields[b"e"]) for part in rows for _, fields in part]


def epoch(t: datetime) -> int:
    return int(t.timestamp())


def utc_times(fires: list[datetime]) -> list[datetime]:
    return [f.astimezone(UTC) for f in fires]


# -- exactly once across replicas --------------------------------------------------------------------------------


async def test_three_replicas_fire_each_scheduled_time_exactly_once(deps: Deps, settings: Settings) -> None:
    minutely = {"every-minute": spec("* * * * *")}
    start = utc(2026, 6, 1, 12, 0)
    skews = [timedelta(seconds=s) for s in (-0.4, 0.0, 0.7)]  # the replicas' clocks differ a little
    fired: list[Fired] = []
    nows: list[datetime] = []
    async with AsyncExitStack() as stack:
        # three schedulers, each with its own connections, as three processes would have
        replicas = [with_schedules(await stack.enter_async_context(open_deps(settings)), **minutely) for _ in skews]
        first = await asyncio.gather(*(tick(r, start - timedelta(seconds=30)) for r in replicas))
        assert first == [[], [], []], "a schedule's first look fires nothing of the past"
        for minute in range(5):
            for burst in (0.0, 0.3, 0.6):  # several ticks per scheduled time, all replicas at once
                at = [start + timedelta(minutes=minute, seconds=burst) + s for s in skews]
                nows += at
                results = await asyncio.gather(*(tick(r, now) for r, now in zip(replicas, at, strict=True)))
                fired += [f for result in results for f in result]

    expected = [f"sched-every-minute-{epoch(start) + 60 * m}" for m in range(5)]
    assert sorted(f.thread_id for f in fired if not f.duplicate) == expected, "each time put on the stream once"
    assert {f.thread_id for f in fired} == set(expected) and not any(f.late for f in fired)
    events = await inbound(deps)
    messages = [e for e in events if isinstance(e, MessageReceived)]
    assert sorted(e.key for e in messages) == [f"schedule:every-minute:{epoch(start) + 60 * m}" for m in range(5)]
    assert sorted(e.thread_id for e in messages) == expected
    launched = [e for e in events if isinstance(e, ThreadLaunched)]
    assert sorted(e.thread_id for e in launched) == expected, "one launch per thread: the launch dedupes too"
    assert {e.ref for e in launched} == {ChannelRef(kind="terminal", address="", user="schedule:every-minute")}
    stored = float(await deps.redis.get(last_key(deps.keys, "every-minute")))
    assert stored == pytest.approx(max(nows).timestamp()), "'last' only ever moves forwards"


# -- missed times ----------------------------------------------------------------------------------------------


async def test_missed_times_follow_the_catch_up_policy_and_nothing_fires_twice(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="channels.schedules")
    d = with_schedules(deps, skipper=spec("* * * * *"), catcher=spec("* * * * *", catch_up="run_once"))
    t0 = utc(2026, 6, 1, 12, 0, 30)

    def seen(fired: list[Fired]) -> dict[str, list[tuple[str, bool]]]:
        out: dict[str, list[tuple[str, bool]]] = {"skipper": [], "catcher": []}
        for f in fired:
            out[f.schedule].append((f.at.strftime("%H:%M"), f.late))
        return out

    assert await tick(d, t0) == []
    assert seen(await tick(d, t0 + timedelta(seconds=30.5))) == {"skipper": [("12:01", False)],
                                                                 "catcher": [("12:01", False)]}  # fmt: skip
    # no scheduler runs through 12:02 and 12:03; one is back at 12:04:05 (12:03 is 65 s old: missed)
    back = utc(2026, 6, 1, 12, 4, 5)
    assert seen(await tick(d, back)) == {"skipper": [("12:04", False)], "catcher": [("12:03", True), ("12:04", False)]}
    for again in (back, back + timedelta(seconds=15)):
        assert await tick(d, again) == [], "nothing fires twice"
    # 50 s late is still on time (inside the grace window): fires, whatever the policy
    assert seen(await tick(d, utc(2026, 6, 1, 12, 5, 50))) == {"skipper": [("12:05", False)],
                                                               "catcher": [("12:05", False)]}  # fmt: skip

    keys = sorted(e.key for e in await inbound(deps) if isinstance(e, MessageReceived))
    minute = {m: epoch(utc(2026, 6, 1, 12, m)) for m in range(1, 6)}
    assert keys == sorted(
        [f"schedule:skipper:{minute[m]}" for m in (1, 4, 5)] + [f"schedule:catcher:{minute[m]}" for m in (1, 3, 4, 5)]
    )
    messages = [r.getMessage() for r in caplog.records]
    for m in ("02", "03"):
        skipped = f"schedule skipper skipped 2026-06-01T12:{m}:00+00:00"
        assert f"{skipped}: no scheduler ran then (catch_up: skip)" in messages
    assert (
        "schedule catcher missed 2 time(s) from 2026-06-01T12:02:00+00:00 to 2026-06-01T12:03:00+00:00; "
        "running once for 2026-06-01T12:03:00+00:00" in messages
    )


async def test_a_long_outage_runs_once_and_logs_a_bounded_number_of_skips(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="channels.schedules")
    d = with_schedules(deps, skipper=spec("0 * * * *"), catcher=spec("0 * * * *", catch_up="run_once"))
    assert await tick(d, utc(2026, 6, 1, 0, 30)) == []
    fired = await tick(d, utc(2026, 6, 4, 0, 30))  # three days later: 72 hourly times missed
    assert [(f.schedule, f.at, f.late) for f in fired] == [("catcher", utc(2026, 6, 4, 0, 0), True)]
    skips = [r.getMessage() for r in caplog.records if "schedule skipper skipped" in r.getMessage()]
    assert len(skips) == 21 and skips[-1] == "schedule skipper skipped 52 more time(s) up to 2026-06-04T00:00:00+00:00"


# -- daylight saving time ----------------------------------------------------------------------------------------


def test_nine_in_berlin_is_0700z_in_summer_time_and_0800z_in_winter_time() -> None:
    nine = spec("0 9 * * *", "Europe/Berlin")
    autumn = next_fires(nine, utc(2026, 10, 22, 12), 5)
    assert utc_times(autumn) == [utc(2026, 10, d, 7 if d < 25 else 8) for d in range(23, 28)]
    assert all(f.tzinfo == BERLIN and (f.hour, f.minute) == (9, 0) for f in autumn), "returned in local time"
    spring = next_fires(nine, utc(2026, 3, 27, 12), 3)
    assert utc_times(spring) == [utc(2026, 3, 28, 8), utc(2026, 3, 29, 7), utc(2026, 3, 30, 7)]


def test_a_time_that_does_not_exist_on_the_spring_day_fires_once_when_the_clocks_jump() -> None:
    # On 29 March 2026 Berlin's clocks go from 02:00 CET straight to 03:00 CEST: 02:30 never happens. croniter
    # fires it at the jump, 03:00 CEST (01:00Z), as Vixie cron runs jobs of the skipped hour right after the
    # change: once that day, neither skipped nor doubled.
    fires = next_fires(spec("30 2 * * *", "Europe/Berlin"), utc(2026, 3, 27, 12), 3)
    assert [f.isoformat() for f in fires] == [
        "2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"
    ]  # fmt: skip
    # a schedule that runs every hour just has no 02:xx that day; the real hours keep their runs
    hourly = next_fires(spec("15 * * * *", "Europe/Berlin"), utc(2026, 3, 28, 23, 30), 3)
    assert [f.strftime("%H:%M%z") for f in hourly] == ["01:15+0100", "03:15+0200", "04:15+0200"]


def test_a_time_that_happens_twice_on_the_autumn_day_fires_once() -> None:
    # On 25 October 2026 Berlin's clocks go back from 03:00 CEST to 02:00 CET: 02:30 happens twice. croniter
    # yields both; a fixed-time schedule fires at the first only (Vixie cron does the same).
    nightly = spec("30 2 * * *", "Europe/Berlin")
    fires = next_fires(nightly, utc(2026, 10, 23, 12), 3)
    assert [f.isoformat() for f in fires] == [
        "2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"
    ]  # fmt: skip
    # a scheduler that first looks between the two 02:30s (or during the second) does not see a new fire
    for looked in (utc(2026, 10, 25, 0, 45), utc(2026, 10, 25, 1, 10)):
        assert next_fires(nightly, looked, 1)[0].isoformat() == "2026-10-26T02:30:00+01:00"
    # a schedule that runs every hour keeps running every real half hour through both copies of the hour
    half = next_fires(spec("*/30 * * * *", "Europe/Berlin"), utc(2026, 10, 24, 23, 45), 5)
    assert utc_times(half) == [utc(2026, 10, 25, 0, 0) + timedelta(minutes=30 * i) for i in range(5)]
    assert [f.strftime("%H:%M%z") for f in half] == ["02:00+0200", "02:30+0200", "02:00+0100", "02:30+0100",
                                                     "03:00+0100"]  # fmt: skip


async def test_ticking_through_both_dst_nights_fires_a_0230_schedule_once_each_night(deps: Deps) -> None:
    nights = {
        "spring": (utc(2026, 3, 28, 22), "2026-03-29T03:00:00+02:00"),
        "autumn": (utc(2026, 10, 24, 22), "2026-10-25T02:30:00+02:00"),
    }
    for name, (evening, expected) in nights.items():
        d = with_schedules(deps, **{name: spec("30 2 * * *", "Europe/Berlin")})
        fired = [f for k in range(0, 6 * 60, 5) for f in await tick(d, evening + timedelta(minutes=k))]
        assert [(f.at.isoformat(), f.late, f.duplicate) for f in fired] == [(expected, False, False)], name


# -- a fired schedule runs -----------------------------------------------------------------------------------------


async def test_a_fired_schedule_runs_its_agent_and_replies_on_the_configured_channel(
    deps: Deps, start_worker: Any
) -> None:
    await start_worker()
    assert await tick(deps, utc(2026, 6, 1, 6, 59, 30)) == []  # Monday, 08:59:30 in Berlin: the schedules start
    [fired] = await tick(deps, utc(2026, 6, 1, 7, 0, 1))
    assert (fired.schedule, fired.at.isoformat()) == ("morning-check", "2026-06-01T09:00:00+02:00")

    thread = await wait_for(deps, fired.thread_id, status_is(Status.DONE))
    ref = ChannelRef(kind="terminal", address="ops-room", user="schedule:morning-check")
    assert (thread.agent, thread.origin) == ("refund-desk", ref)
    assert [e.type for e in thread.events] == ["thread.launched", "message.received", "reply"]
    reply = thread.events[-1]
    assert isinstance(reply, Reply) and reply.text.startswith("I can refund orders.")
    said = [Outbound.model_validate_json(f[b"m"]) for _, f in await deps.redis.xrange(deps.keys.outbox("terminal"))]
    assert [(m.thread_id, m.ref, m.kind, m.text) for m in said] == [(fired.thread_id, ref, "text", reply.text)]


async def test_the_scheduler_loop_rides_out_a_redis_outage(deps: Deps, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="channels.schedules")
    d = with_schedules(deps, minutely=spec("* * * * *"))
    clock = [utc(2026, 6, 1, 12, 0, 30)]
    stop = asyncio.Event()
    loop = asyncio.create_task(schedules.run_scheduler(d, stop, interval=0.01, clock=lambda: clock[0]))

    async def until(check: Callable[[], Awaitable[Any]]) -> None:
        for _ in range(500):
            if await check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never happened")

    await until(lambda: deps.redis.exists(last_key(deps.keys, "minutely")))
    live, d.redis = d.redis, aioredis.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
    clock[0] = utc(2026, 6, 1, 12, 1, 10)

    async def warned() -> bool:
        return any("scheduler cannot reach Redis" in r.getMessage() for r in caplog.records)

    await until(warned)
    assert not loop.done()
    await d.redis.aclose()
    d.redis = live  # Redis is back, 10 s after 12:01: still on time

    async def fired() -> bool:
        return any(isinstance(e, MessageReceived) for e in await inbound(deps))

    await until(fired)
    stop.set()
    await asyncio.wait_for(loop, 5)
    [message] = [e for e in await inbound(deps) if isinstance(e, MessageReceived)]
    assert message.key == f"schedule:minutely:{epoch(utc(2026, 6, 1, 12, 1))}"


# -- the command line ----------------------------------------------------------------------------------------------


def listing(config: Config, now: datetime) -> str:
    """What `handrail schedules list` should print at ``now`` for schedules that never fired."""

    def when(t: datetime) -> str:
        return f"{t:%Y-%m-%d %H:%M} {t.tzname()} ({t.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"

    lines = []
    for name, s in config.spec.schedules.items():
        where = s.channel.kind + (f":{s.channel.address}" if s.channel.address else "")
        lines.append(f'{name}  "{s.cron}" {s.timezone}  agent {s.agent}  catch-up {s.catch_up}  on {where}')
        lines += [f"  next  {when(t)}" for t in next_fires(s, now, 3)]
        lines.append("  last fired  never")
    return "\n".join(lines) + "\n"


async def test_schedules_list_and_run_from_the_command_line(deps: Deps, env_for: Env, start_worker: Any) -> None:
    env = env_for()
    before = datetime.now(UTC)
    listed = succeeded(await handrail(env, "schedules", "list"))
    assert listed in (listing(deps.agents, before), listing(deps.agents, datetime.now(UTC))), listed
    for head in (
        'morning-check  "0 9 * * 1-5" Europe/Berlin  agent refund-desk  catch-up skip  on terminal:ops-room',
        'night-refunds  "30 2 * * *" Europe/Berlin  agent refund-desk  catch-up run_once  on terminal',
    ):
        assert f"{head}\n  next  " in listed, listed

    await start_worker()
    tids = [succeeded(await handrail(env, "schedules", "run", "morning-check")).strip() for _ in range(2)]
    assert tids[0] != tids[1] and all(t.startswith("sched-morning-check-run-") for t in tids), "a run each time"
    for tid in tids:
        thread = await wait_for(deps, tid, status_is(Status.DONE))
        first = thread.events[1]
        assert isinstance(first, MessageReceived) and first.text == "Morning check: anything to refund?"
        assert first.key.startswith("schedule:morning-check:run:")
        assert thread.origin == ChannelRef(kind="terminal", address="ops-room", user="schedule:morning-check")

    listed = succeeded(await handrail(env, "schedules", "list"))
    last = next(ln for ln in listed.splitlines() if ln.startswith("  last fired  ") and "never" not in ln)
    assert last.endswith(f"  thread {tids[1]}") and (" CET (" in last or " CEST (" in last), listed

    unknown = await handrail(env, "schedules", "run", "nope")
    failed_cleanly(unknown, "Error: no schedule named 'nope' (schedules: morning-check, night-refunds)")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert set(await threads.recent_ids(deps.redis, deps.keys)) == set(tids)


def test_schedules_list_says_so_when_none_are_configured(env_for: Env, tmp_path: Path) -> None:
    config = tmp_path / "handrail.yaml"
    config.write_text("agents:\n  desk: {step: 'agents.refunds:refund_desk'}\n")
    r = run_cli(env_for() | {"HANDRAIL_CONFIG": str(config)}, "schedules", "list")
    assert succeeded(r) == f"no schedules in {config}\n"
    unknown = run_cli(env_for() | {"HANDRAIL_CONFIG": str(config)}, "schedules", "run", "daily")
    failed_cleanly(unknown, f"Error: no schedule named 'daily' (schedules: none are configured in {config})")


def test_the_shipped_example_schedule_loads_and_fires_on_weekday_mornings_in_berlin() -> None:
    config = load_config(ROOT / "config" / "handrail.yaml", ROOT / "prompts")
    digest = config.spec.schedules["morning-digest"]
    assert config.agent(digest.agent).tools  # the deterministic refund desk: works without a model
    fires = next_fires(digest, utc(2026, 10, 23, 12), 3)  # Friday noon, before the clocks go back
    assert [f.isoformat() for f in fires] == [
        "2026-10-26T09:00:00+01:00", "2026-10-27T09:00:00+01:00", "2026-10-28T09:00:00+01:00"
    ]  # fmt: skip


# -- bad configuration ---------------------------------------------------------------------------------------------

AGENT = "agents:\n  desk: {step: 'agents.refunds:refund_desk'}\nschedules:\n  nightly: "


@pytest.mark.parametrize(
    ("schedule", "key", "problem"),
    [
        ("{cron: '61 * * * *', agent: desk, message: hi}", "schedules.nightly",
         "cron: '61 * * * *' is not a valid cron expression"),
        ("{cron: 'every day', agent: desk, message: hi}", "schedules.nightly",
         "cron: 'every day' is not a valid cron expression"),
        ("{cron: '0 9 * * *', timezone: Europe/Berlln, agent: desk, message: hi}", "schedules.nightly",
         "timezone: unknown time zone 'Europe/Berlln'"),
        ("{cron: '0 9 * * *', agent: nobody, message: hi}", "schedules.nightly.agent", "no agent named 'nobody'"),
        ("{cron: '0 9 * * *', agent: desk, message: hi, catch_up: twice}", "schedules.nightly.catch_up",
         "'skip' or 'run_once'"),
        ("{cron: '0 9 * * *', agent: desk}", "schedules.nightly.message", "Field required"),
    ],
    ids=["bad-minute", "not-cron", "bad-zone", "unknown-agent", "bad-policy", "no-message"],
)  # fmt: skip
def test_a_bad_schedule_fails_config_loading_naming_its_key(
    tmp_path: Path, schedule: str, key: str, problem: str
) -> None:
    path = tmp_path / "handrail.yaml"
    path.write_text(AGENT + schedule + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ROOT / "prompts")
    assert (caught.value.path, caught.value.key) == (str(path), key)
    assert problem in caught.value.problem


def test_the_scheduler_and_schedule_commands_refuse_a_bad_schedule_cleanly(env_for: Env, tmp_path: Path) -> None:
    path = tmp_path / "handrail.yaml"
    path.write_text(AGENT + "{cron: '0 9 * * *', timezone: Mars/Olympus, agent: desk, message: hi}\n")
    env = env_for() | {"HANDRAIL_CONFIG": str(path)}
    for command in (["scheduler"], ["schedules", "list"], ["schedules", "run", "nightly"]):
        r = run_cli(env, *command)
        assert r.returncode == 1, (command, r.stderr)
        failed_cleanly(r, f"Error: {path}: schedules.nightly: Value error, timezone: unknown time zone 'Mars/Olympus'")
