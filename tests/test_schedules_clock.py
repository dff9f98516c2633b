"""Schedulers agree on "now" through Redis TIME: a machine whose clock runs fast neither fires early nor makes the
others skip."""

from __future__ import annotations

import asyncio
from datetime import datetime, tzinfo

import pytest

from bot.connections import server_time_ms
from bot.runtime import Deps
from channels import schedules


class _HourFast(datetime):
    """The wall clock of a machine an hour ahead."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _HourFast:
        real = datetime.now(tz)
        return cls.fromtimestamp(real.timestamp() + 3600, tz)


async def test_a_scheduler_on_a_machine_with_a_fast_clock_looks_only_as_far_as_redis_time(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedules, "datetime", _HourFast)
    stop = asyncio.Event()
    task = asyncio.create_task(schedules.run_scheduler(deps, stop, interval=0.01))
    key = schedules.last_key(deps.keys, "morning-check")
    try:
        for _ in range(200):
            if await deps.redis.get(key):
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
    looked = float(await deps.redis.get(key) or 0) * 1000
    assert abs(looked - await server_time_ms(deps.redis)) < 5000, "an hour ahead would be 3,600,000 ms off"


async def test_a_manual_run_records_redis_time_as_when_it_fired(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedules, "datetime", _HourFast)
    await schedules.fire_now(deps, "morning-check")
    fired = await deps.redis.hgetall(schedules.fired_key(deps.keys, "morning-check"))
    assert abs(float(fired[b"at"]) * 1000 - await server_time_ms(deps.redis)) < 5000
