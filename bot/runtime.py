"""The explicit context every part of Handrail receives: Redis, keys, the bus, settings and the config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

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
async def open_deps(settings: Settings | None = None, *, with_config: bool = True) -> AsyncIterator[Deps]:
    """Open Redis (embedded if REDIS_URL is unset) and load the config; close in reverse order."""
    settings = settings or Settings.from_env()
    config = load_config(settings.config_path, settings.prompts_dir) if with_config else None
    # every owned partition holds a connection in a blocking read; leave room for everything else
    client = connect(redis_url(settings.redis_url, settings.data_dir), max_connections=settings.partitions + 48)
    try:
        keys = Keys(settings.namespace, settings.partitions)
        bus = Bus(client, keys)
        await bus.ensure_groups()
        yield Deps(client, keys, bus, settings, config)
    finally:
        await client.aclose()
