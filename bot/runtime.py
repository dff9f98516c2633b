"""The explicit context every part of Handrail receives: Redis, keys, the bus, settings and the config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from bot import install
from bot.bus import Bus
from bot.config import Config, load_config
from bot.connections import connect, redis_url
from bot.keys import Keys
from bot.settings import Settings


@dataclass
class Deps:
    redis: aioredis.Redis
    keys: Keys
    bus: Bus
    settings: Settings
    config: Config | None  # None for commands that never run an agent

    @property
    def agents(self) -> Config:
        if self.config is None:
            raise RuntimeError("this command was opened without the agents' configuration")
        return self.config


@asynccontextmanager
async def open_deps(
    settings: Settings | None = None, *, with_config: bool = True, check_settings: bool = True
) -> AsyncIterator[Deps]:
    """Open Redis (embedded if REDIS_URL is unset), check it and the installation's recorded settings, and load
    the config; close in reverse order. ``check_settings=False`` is for the commands that change those settings."""
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path, settings.prompts_dir) if with_config else None
    # every owned partition holds a connection in a blocking read; leave room for the threads' commits
    client = connect(
        redis_url(settings.redis_url, settings.data_dir),
        max_connections=settings.partitions + 256,
        timeout_ms=settings.redis_timeout_ms,
        retry_ms=settings.redis_retry_ms,
    )
    try:
        keys = Keys(settings.namespace, settings.partitions)
        await install.check_eviction(client, allow=settings.allow_eviction)
        if check_settings:
            await install.check(client, keys)
        bus = Bus(client, keys)
        yield Deps(client, keys, bus, settings, config)
    finally:
        await client.aclose()


async def check_installation(deps: Deps) -> None:
    """Check the recorded settings again (SettingsMismatch if they changed); if Redis came back empty, record
    them again. Cheap (one GET): call it from loops that outlive a Redis restart."""
    await install.check(deps.redis, deps.keys)
