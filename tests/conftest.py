"""Fixtures over real parts: a real Redis, real workers, litellm's real HTTP path against a scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bot import threads
from bot.connections import embedded_url
from bot.runtime import Deps, open_deps
from bot.settings import Settings
from bot.threads import Status, Thread
from bot.worker import Worker
from tests.scripted_model import ScriptedModel

ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG = ROOT / "tests" / "config" / "handrail.yaml"

# litellm must never fetch its price list in tests (see bot/llm.py); set before anything imports it.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
# The test config's webhook subscribers sign with this; every worker (and `handrail worker`) needs it at start.
# Standard Webhooks form: "whsec_" + base64 of 24-64 bytes (here b"test-only-not-a-secret-1234").
os.environ.setdefault("TEST_WEBHOOK_SECRET", "whsec_dGVzdC1vbmx5LW5vdC1hLXNlY3JldC0xMjM0")
# The test config's MCP server (tests/mcp_tool_server.py) runs under this interpreter, from this checkout.
os.environ.setdefault("TEST_PYTHON", sys.executable)
os.environ.setdefault("TEST_ROOT", str(ROOT))


# -- no network: only loopback and unix sockets ----------------------------------------------------------------

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> object:
    if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise RuntimeError(f"test tried to reach the network ({host}); tests must stay on this machine")
    return _real_connect(self, address)  # type: ignore[arg-type]


_real_getaddrinfo = socket.getaddrinfo


def _guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
    if isinstance(host, bytes):
        host = host.decode()
    if host not in (None, "localhost") and not str(host).startswith(("127.", "::1")):
        raise RuntimeError(f"test tried to resolve {host}; tests must stay on this machine")
    return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection off this machine is an error, not a hang."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)


# -- Redis -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """REDIS_URL if set (CI uses the machine's server), else an embedded server for this session."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    return embedded_url(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Fresh settings per test: its own key namespace, small partitions and short leases."""
    return Settings(
        redis_url=redis_url,
        config_path=TEST_CONFIG,
        data_dir=ROOT / ".handrail",
        prompts_dir=ROOT / "prompts",
        partitions=4,
        lease_ms=1000,
        max_deliveries=3,
        namespace=f"test-{uuid.uuid4().hex[:10]}",
    )


@pytest.fixture
async def deps(settings: Settings, model: ScriptedModel) -> AsyncIterator[Deps]:
    """Redis and the test config, loaded after the scripted model's address is in the environment."""
    async with open_deps(settings) as d:
        yield d
        # clean up after ourselves: every key of this test's namespace
        keys = [k async for k in d.redis.scan_iter(match=f"{settings.namespace}:*", count=1000)]
        if keys:
            await d.redis.delete(*keys)


@pytest.fixture
def env_for(settings: Settings) -> Callable[..., dict[str, str]]:
    """Environment for a worker subprocess that shares this test's Redis namespace."""

    def make(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.update(
            REDIS_URL=str(settings.redis_url),
            HANDRAIL_CONFIG=str(settings.config_path),
            HANDRAIL_NAMESPACE=settings.namespace,
            HANDRAIL_PARTITIONS=str(settings.partitions),
            HANDRAIL_LEASE_MS=str(settings.lease_ms),
            HANDRAIL_PROMPTS=str(settings.prompts_dir),
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env

    return make


# -- workers -------------------------------------------------------------------------------------------------------


@pytest.fixture
async def start_worker(deps: Deps) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Start in-process workers; they stop (and release their partitions) when the test ends."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start(d: Deps | None = None) -> Worker:
        w = Worker(d or deps)
        tasks.append(asyncio.create_task(w.run(stop)))
        for _ in range(100):  # until it holds partitions
            if w.owned:
                break
            await asyncio.sleep(0.02)
        return w

    yield start
    stop.set()
    await asyncio.gather(*tasks)


async def wait_for(
    deps: Deps,
    thread_id: str,
    until: Callable[[Thread], bool],
    timeout: float = 10.0,
) -> Thread:
    """Poll a thread's log until ``until`` holds; fail with the timeline if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    thread = Thread(thread_id)
    while loop.time() < deadline:
        thread = await threads.load(deps.redis, deps.keys, thread_id)
        if thread.events and until(thread):
            return thread
        await asyncio.sleep(0.02)
    timeline = "\n".join(f"  {e.type}: {e.model_dump(exclude={'thread_id'})}" for e in thread.events)
    raise AssertionError(
        f"thread {thread_id} never got there; status {thread.status if thread.events else '-'}:\n{timeline}"
    )


def status_is(*statuses: Status) -> Callable[[Thread], bool]:
    return lambda t: t.status in statuses


# -- the scripted model --------------------------------------------------------------------------------------------


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedModel]:
    """A local OpenAI-compatible server that answers from a script; the test config's LLM agents use it."""
    server = ScriptedModel()
    server.start()
    monkeypatch.setenv("TEST_MODEL_API_BASE", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def web_client(deps: Deps, bind: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """The web app under uvicorn on a free port (a port-0 socket bound to ``bind``), and an HTTP client for it
    (through loopback)."""
    from bot.web import serve

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((bind, 0))
    stop = asyncio.Event()
    server = asyncio.create_task(serve(deps, stop, sock=sock))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=10) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.02)
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        sock.close()


def python() -> str:
    return sys.executable
