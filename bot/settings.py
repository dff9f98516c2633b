"""Secrets and endpoints from the environment, read once into a typed object that fails loudly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bot.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = field(repr=False)  # None: the embedded Redis, data under data_dir; may hold a password
    config_path: Path
    data_dir: Path
    prompts_dir: Path = Path("prompts")
    partitions: int = 16  # the inbound stream is split by thread so each thread has one writer
    lease_ms: int = 5000  # a dead worker's partitions move to another after this long
    max_deliveries: int = 3  # failed attempts at one inbound entry before it goes to the dead-letter stream
    namespace: str = "hr"  # prefix of every Redis key
    drain_seconds: float = 20.0  # on hand-over and shutdown, how long running steps may take to finish
    retention_days: int = 30  # a finished thread is deleted this long after its last event; 0 keeps it forever
    retention_sweep_s: int = 3600  # how often one process (up or scheduler) looks for expired threads
    redis_timeout_ms: int = 500  # one Redis attempt (connect, or a reply) fails after this long
    redis_retry_ms: int = 1000  # a Redis call retries a dropped connection for at most this long, then fails
    allow_eviction: bool = False  # run on a Redis whose maxmemory-policy may evict Handrail's keys

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            redis_url=_redis_url(env),
            config_path=Path(env.get("HANDRAIL_CONFIG", "config/handrail.yaml")),
            data_dir=Path(env.get("HANDRAIL_DATA", ".handrail")),
            prompts_dir=Path(env.get("HANDRAIL_PROMPTS", "prompts")),
            partitions=_int(env, "HANDRAIL_PARTITIONS", 16, 1, 1024),
            lease_ms=_int(env, "HANDRAIL_LEASE_MS", 5000, 200, 600_000),
            max_deliveries=_int(env, "HANDRAIL_MAX_DELIVERIES", 3, 1, 100),
            namespace=env.get("HANDRAIL_NAMESPACE", "hr"),
            drain_seconds=_int(env, "HANDRAIL_DRAIN_SECONDS", 20, 0, 3600),
            retention_days=_int(env, "HANDRAIL_RETENTION_DAYS", 30, 0, 36_500),
            retention_sweep_s=_int(env, "HANDRAIL_RETENTION_SWEEP_S", 3600, 10, 7 * 86_400),
            redis_timeout_ms=_int(env, "HANDRAIL_REDIS_TIMEOUT_MS", 500, 50, 60_000),
            redis_retry_ms=_int(env, "HANDRAIL_REDIS_RETRY_MS", 1000, 0, 600_000),
            allow_eviction=_flag(env, "HANDRAIL_ALLOW_EVICTION"),
        )


def _redis_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("REDIS_URL") or None
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parts = None
    db = parts.path.strip("/") if parts is not None and parts.scheme.lower() != "unix" else ""
    if parts is None or parts.scheme.lower() not in ("redis", "rediss", "unix") or not (db == "" or db.isdigit()):
        # not shown: a URL that does not parse may show its password anywhere (and redis-py would quietly take
        # database 0 for a path that is not a number)
        raise ConfigError("environment", "REDIS_URL", "expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://… or "
                          "unix://[:PASSWORD@]/PATH; %-encode any / ? # @ : in the password")  # fmt: skip
    return raw


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError("environment", name, f"expected a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError("environment", name, f"must be between {lo} and {hi}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError("environment", name, f"expected 1 or 0, got {raw!r}")
