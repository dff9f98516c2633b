"""Redis stopped, frozen or restarted empty: the web answers 503 within a second and recovers on its own; a Redis
that may evict keys is refused at start."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from bot import install
from bot.errors import HandrailError
from bot.runtime import Deps, open_deps
from bot.settings import Settings
from tests.conftest import web_client
from tests.scripted_model import ScriptedModel
from tests.test_redis_restart import RedisServer

READER = {"Authorization": "Bearer reader-key"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "a")
    (tmp_path / "a").mkdir()
    server.start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)  # a test that froze it and failed must not leave it stopped
    server.stop()


@pytest.fixture
def own_settings(own_redis: RedisServer, settings: Settings) -> Settings:
    return replace(settings, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")


@pytest.fixture
async def web(
    own_settings: Settings, model: ScriptedModel, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Deps, httpx.AsyncClient]]:
    monkeypatch.setenv("TEST_API_KEY_READER", "reader-key")
    async with open_deps(own_settings) as d, web_client(d) as client:
        assert (await client.get("/readyz")).status_code == 200
        yield d, client


async def _timed(client: httpx.AsyncClient, path: str) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.get(path, headers=READER)
    return response.status_code, time.monotonic() - started


async def _answers_503_quickly(client: httpx.AsyncClient) -> None:
    for path in ("/readyz", "/api/v1/threads", "/readyz"):  # twice: a dead pooled connection, then a fresh one
        status, took = await _timed(client, path)
        assert (status, took < 1.0) == (503, True), f"{path}: {status} after {took:.2f} s"


async def _ready_again(client: httpx.AsyncClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, (await client.get("/readyz")).json()
        await asyncio.sleep(0.05)
    assert (await client.get("/api/v1/threads", headers=READER)).status_code == 200


async def test_a_stopped_redis_is_503_within_a_second_and_a_restart_is_ready_again(
    web: tuple[Deps, httpx.AsyncClient], own_redis: RedisServer
) -> None:
    _, client = web
    own_redis.stop()
    await _answers_503_quickly(client)
    own_redis.start()
    await _ready_again(client)


async def test_a_frozen_redis_is_503_within_a_second_and_ready_again_when_it_thaws(
    web: tuple[Deps, httpx.AsyncClient], own_redis: RedisServer
) -> None:
    _, client = web
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        await _answers_503_quickly(client)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await _ready_again(client)


async def test_redis_restarted_empty_gets_its_settings_recorded_again_without_restarting_the_app(
    web: tuple[Deps, httpx.AsyncClient], own_redis: RedisServer, tmp_path: Path
) -> None:
    d, client = web
    own_redis.stop()
    own_redis.workdir = tmp_path / "empty"  # no append-only file: it comes back with nothing
    own_redis.workdir.mkdir()
    own_redis.start()
    await _ready_again(client)
    assert install.Recorded.load(await d.redis.get(d.keys.settings)) == install.ours(d.keys)


async def test_a_blocking_read_waits_its_block_time_past_the_socket_timeout(own_settings: Settings) -> None:
    async with open_deps(replace(own_settings, redis_timeout_ms=200), with_config=False) as d:
        started = time.monotonic()
        assert await d.redis.xread({d.keys.inbound(0): "$"}, block=600) == []
        assert time.monotonic() - started >= 0.55
        assert await d.redis.ping()  # and the next command has the short timeout again (nothing left pending)


# -- maxmemory-policy ----------------------------------------------------------------------------------------


async def test_a_redis_that_may_evict_keys_is_refused_unless_allowed(own_settings: Settings) -> None:
    admin = aioredis.Redis.from_url(str(own_settings.redis_url))
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    await admin.aclose()
    with pytest.raises(HandrailError, match=r"maxmemory-policy is 'allkeys-lru'.*noeviction.*HANDRAIL_ALLOW_EVICTION"):
        async with open_deps(own_settings, with_config=False):
            pass
    async with open_deps(replace(own_settings, allow_eviction=True), with_config=False) as d:
        assert await d.redis.ping()


async def test_a_redis_that_forbids_config_get_is_trusted_with_a_warning(
    own_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    admin = aioredis.Redis.from_url(str(own_settings.redis_url))
    await admin.execute_command("ACL", "SETUSER", "app", "on", "nopass", "~*", "&*", "+@all", "-config")
    await admin.aclose()
    url = str(own_settings.redis_url).replace("redis://", "redis://app@")
    with caplog.at_level(logging.WARNING, logger="bot.install"):
        async with open_deps(replace(own_settings, redis_url=url), with_config=False) as d:
            assert await d.redis.ping()
    assert "cannot read Redis's maxmemory-policy" in caplog.text
