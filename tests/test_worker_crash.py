"""A worker killed mid-step: another finishes the thread, nothing lost, no completed call run again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from bot import control, threads
from bot.events import ChannelRef, ToolResult
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import ROOT, python, status_is, wait_for
from tests.scripted_model import ScriptedModel, call, text

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


def spawn_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A worker in its own process (its log goes to the test's output if it fails)."""
    return subprocess.Popen([python(), "-m", "bot.cli", "worker"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


async def test_worker_killed_while_a_tool_runs(
    deps: Deps, env_for: Callable[..., dict[str, str]], start_worker: Any
) -> None:
    victim = spawn_worker(env_for(SLOW_TOOL_SECONDS="30"))
    try:
        accepted = await control.launch(deps, "slow-desk", "refund A100", ALICE)
        thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=20)
        request = thread.open_approval()
        assert request is not None
        await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
        runs = f"{deps.keys.ns}:slow:runs"
        for _ in range(200):  # until the tool is running in the victim
            if await deps.redis.llen(runs):
                break
            await asyncio.sleep(0.05)
        assert await deps.redis.llen(runs) == 1
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)
    finally:
        if victim.poll() is None:
            victim.kill()

    os.environ["SLOW_TOOL_SECONDS"] = "0"
    try:
        await start_worker()  # the survivor takes over the partitions once the victim's leases lapse
        thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=15)
    finally:
        del os.environ["SLOW_TOOL_SECONDS"]
    key = f"{accepted.thread_id}:{request.call_id}"
    # the interrupted call ran again with the same idempotency key, so its effect happened once
    assert await deps.redis.lrange(runs, 0, -1) == [key.encode(), key.encode()]
    assert await deps.redis.hgetall(f"{deps.keys.ns}:slow:ledger") == {key.encode(): b"A100"}
    assert sum(isinstance(e, ToolResult) for e in thread.events) == 1
    assert [e.type for e in thread.events].count("approval.decided") == 1
    assert thread.events[-1].type == "reply"


async def test_worker_killed_after_a_tool_completed_does_not_run_it_again(
    deps: Deps, env_for: Callable[..., dict[str, str]], start_worker: Any, model: ScriptedModel
) -> None:
    # The model call after the tool's result hangs; the worker dies there. The scripted model serves both.
    model.add(call("lookup_order", {"order_id": "A101"}))
    model.add(text("too late"), delay=30)  # the victim waits on this one when it is killed
    model.add(call("reply", {"text": "A101 is a USB-C cable for $19.00."}))
    victim = spawn_worker(env_for(TEST_MODEL_API_BASE=model.url))
    try:
        accepted = await control.launch(deps, "support", "what is order A101?", ALICE)
        looked_up = lambda t: any(isinstance(e, ToolResult) and e.call_id != "prefetch-0" for e in t.events)  # noqa: E731
        await wait_for(deps, accepted.thread_id, looked_up, timeout=30)
        for _ in range(200):
            if len(model.requests) == 2:
                break
            await asyncio.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)
    finally:
        if victim.poll() is None:
            victim.kill()
    await start_worker()
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=20)
    results = [e for e in thread.events if isinstance(e, ToolResult)]
    assert results[0].call_id == "prefetch-0"
    assert len(results) == 2, "the completed lookup was not run again"
    assert thread.events[-1].text == "A101 is a USB-C cable for $19.00."  # type: ignore[union-attr]
    loaded = await threads.load(deps.redis, deps.keys, accepted.thread_id)
    assert len(loaded.events) == len(thread.events)
