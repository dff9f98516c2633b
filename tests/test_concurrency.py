"""Threads side by side inside a worker, timeouts, model outages, and hand-overs that drain instead of cutting off."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

from bot import control, threads
from bot.events import ChannelRef, ModelUnavailable, Reply, ThreadFailed, ToolResult
from bot.outbox import Outbound
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for
from tests.scripted_model import ScriptedModel, fail, text
from tests.test_worker_crash import spawn_worker

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


def same_partition(deps: Deps, n: int, prefix: str = "side") -> list[str]:
    """``n`` thread ids that all land on one inbound partition."""
    ids = [f"{prefix}-{i}" for i in range(200)]
    p = deps.keys.partition(ids[0])
    return [i for i in ids if deps.keys.partition(i) == p][:n]


async def said(deps: Deps) -> list[Outbound]:
    return [Outbound.model_validate_json(f[b"m"]) for _, f in await deps.redis.xrange(deps.keys.outbox("terminal"))]


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_a_tool_that_never_returns_times_out_and_its_partition_goes_on(deps: Deps, start_worker: Any) -> None:
    stuck, other = same_partition(deps, 2)
    await start_worker()
    await control.launch(deps, "hang-desk", "hang", ALICE, thread_id=stuck)
    await until(lambda: deps.redis.llen(f"{deps.keys.ns}:hang:runs"))
    # a thread of the same partition is not held up by the stuck tool
    await control.launch(deps, "refund-desk", "refund A100 25", ALICE, thread_id=other)
    await wait_for(deps, other, status_is(Status.WAITING_APPROVAL), timeout=5)
    assert not any(isinstance(e, ToolResult) for e in (await threads.load(deps.redis, deps.keys, stuck)).events)
    thread = await wait_for(deps, stuck, status_is(Status.DONE), timeout=10)
    [result] = [e for e in thread.events if isinstance(e, ToolResult)]
    assert not result.ok and result.error.startswith("timed out after 1 s")
    assert thread.events[-1].text.startswith("failed: timed out after 1 s")  # type: ignore[union-attr]


async def test_threads_of_one_partition_wait_on_the_model_side_by_side(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    ids = same_partition(deps, 8)
    model.add(*[text(f"answer {i}") for i in range(len(ids))], delay=1.0)
    await start_worker()
    for tid in ids:
        await control.launch(deps, "patient", "hello", ALICE, thread_id=tid)
    for tid in ids:
        await wait_for(deps, tid, status_is(Status.DONE), timeout=20)
    # one partition, one worker, yet the model was asked on behalf of several threads at once
    assert model.max_in_flight >= 4, model.max_in_flight


async def test_cancel_abandons_a_model_call_in_flight(deps: Deps, start_worker: Any, model: ScriptedModel) -> None:
    model.add(text("an answer nobody waits for"), delay=15)
    await start_worker()
    accepted = await control.launch(deps, "patient", "hello", ALICE)
    await until(lambda: _true(model.in_flight == 1))
    await control.cancel(deps, accepted.thread_id, "terminal:alice", "changed my mind")
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.CANCELLED), timeout=5)
    assert not any(isinstance(e, Reply) for e in thread.events)
    assert await deps.redis.xlen(deps.keys.inbound_for(accepted.thread_id)) == 0  # both entries acknowledged


async def _true(value: bool) -> bool:
    return value


async def test_a_model_outage_is_recorded_told_and_outlived(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.down_for(2.5)
    model.add(text("Back again: here is your answer."))
    await start_worker()
    accepted = await control.launch(deps, "patient", "hello?", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=20)
    outages = [e for e in thread.events if isinstance(e, ModelUnavailable)]
    assert len(outages) >= 3 and [o.attempt for o in outages] == list(range(1, len(outages) + 1))
    assert sum(o.notified for o in outages) == 1, "the humans are told once, after notify_after"
    assert "503" in outages[0].error
    assert [e.type for e in thread.events].count("message.received") == 1
    assert thread.events[-1].text == "Back again: here is your answer."  # type: ignore[union-attr]
    kinds = [(m.kind, m.text) for m in await said(deps)]
    assert [k for k, _ in kinds] == ["error", "text"]
    assert "not answering" in kinds[0][1]
    assert await deps.bus.dead_letters() == []


async def test_a_message_sent_during_an_outage_is_answered_with_the_first(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.down_for(1.5)
    model.add(text("Answering both."))
    await start_worker()
    accepted = await control.launch(deps, "patient", "first", ALICE)
    await wait_for(deps, accepted.thread_id, lambda t: any(isinstance(e, ModelUnavailable) for e in t.events))
    await control.send(deps, accepted.thread_id, "second", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=20)
    assert [e.text for e in thread.events if e.type == "message.received"] == ["first", "second"]  # type: ignore[union-attr]
    assert "text: second" in str(model.requests[-1]["messages"][1]["content"])
    assert await deps.redis.xlen(deps.keys.inbound_for(accepted.thread_id)) == 0
    assert await deps.bus.dead_letters() == []


async def test_a_request_the_provider_refuses_fails_the_thread_with_its_reason(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(fail(400, "This model's maximum context length is 128000 tokens"))
    await start_worker()
    accepted = await control.launch(deps, "patient", "a very long story", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.FAILED), timeout=20)
    failed = thread.events[-1]
    assert isinstance(failed, ThreadFailed) and "maximum context length" in failed.reason
    assert len(model.requests) == 1, "a refusal is not retried"
    assert [(m.kind, m.text) for m in await said(deps)] == [("error", failed.reason)]
    assert await deps.bus.dead_letters() == []


async def _approve_slow_refund(deps: Deps) -> tuple[str, str]:
    accepted = await control.launch(deps, "slow-desk", "refund A100", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=20)
    request = thread.open_approval()
    assert request is not None
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    runs = f"{deps.keys.ns}:slow:runs"
    await until(lambda: deps.redis.llen(runs), timeout=20)
    return accepted.thread_id, f"{accepted.thread_id}:{request.call_id}"


async def test_sigterm_during_a_tool_lets_it_finish_and_nobody_runs_it_again(
    deps: Deps, env_for: Callable[..., dict[str, str]], start_worker: Any
) -> None:
    worker = spawn_worker(env_for(SLOW_TOOL_SECONDS="2"))
    try:
        thread_id, key = await _approve_slow_refund(deps)
        worker.send_signal(signal.SIGTERM)  # a deploy
        assert await asyncio.to_thread(worker.wait, 20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    thread = await threads.load(deps.redis, deps.keys, thread_id)
    [result] = [e for e in thread.events if isinstance(e, ToolResult)]
    assert result.ok, "the tool finished before the worker let go"
    await start_worker()
    thread = await wait_for(deps, thread_id, status_is(Status.DONE), timeout=15)
    runs = await deps.redis.lrange(f"{deps.keys.ns}:slow:runs", 0, -1)
    assert runs == [key.encode()], "the tool ran once"
    assert thread.events[-1].text == "done: {'refunded': 'A100'}"  # type: ignore[union-attr]


async def test_a_hand_over_lets_the_running_tool_finish(deps: Deps, start_worker: Any) -> None:
    os.environ["SLOW_TOOL_SECONDS"] = "1"
    try:
        worker = await start_worker()
        thread_id, key = await _approve_slow_refund(deps)
        p = deps.keys.partition(thread_id)
        worker._hand_off(p)  # as when another worker joins and takes its share
        await until(lambda: _true(p not in worker.owned), timeout=10)
        thread = await threads.load(deps.redis, deps.keys, thread_id)
        assert [e.ok for e in thread.events if isinstance(e, ToolResult)] == [True]
        thread = await wait_for(deps, thread_id, status_is(Status.DONE), timeout=15)  # taken up again
    finally:
        del os.environ["SLOW_TOOL_SECONDS"]
    assert await deps.redis.lrange(f"{deps.keys.ns}:slow:runs", 0, -1) == [key.encode()]


async def test_a_worker_stalled_past_its_lease_strands_nothing(
    deps: Deps, env_for: Callable[..., dict[str, str]], start_worker: Any
) -> None:
    stalled = spawn_worker(env_for())
    try:
        leases = [deps.keys.lease(p) for p in range(deps.keys.partitions)]
        await until(lambda: _all_set(deps, leases), timeout=20)
        stalled.send_signal(signal.SIGSTOP)  # its event loop stops, its blocking reads stay open in Redis
        await asyncio.sleep(deps.settings.lease_ms / 1000 * 1.5)
        survivor = await start_worker()
        await until(lambda: _true(len(survivor.owned) == deps.keys.partitions), timeout=10)
        accepted = await control.launch(deps, "refund-desk", "refund A100 25", ALICE)
        await asyncio.sleep(0.2)
        stalled.send_signal(signal.SIGCONT)  # it wakes, finds its leases gone, and lets go
        thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=10)
        request = thread.open_approval()
        assert request is not None
        await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
        await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=10)
        await control.send(deps, accepted.thread_id, "refund A101 5", ALICE)
        thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=10)
    finally:
        stalled.send_signal(signal.SIGCONT)
        stalled.kill()
        stalled.wait(5)
    once = ["thread.launched", "message.received", "tool.call", "tool.started", "tool.result", "tool.call",
            "approval.requested"]  # fmt: skip
    decided = ["approval.decided", "tool.started", "tool.result", "reply"]
    assert [e.type for e in thread.events] == once + decided + once[1:], "each entry applied once, in order"
    for p in range(deps.keys.partitions):
        assert await deps.redis.xlen(deps.keys.inbound(p)) == 0


async def _all_set(deps: Deps, keys: list[str]) -> bool:
    return bool(await deps.redis.exists(*keys) == len(keys))


async def test_an_entry_dropped_by_a_failing_lane_is_swept_up_and_applied(
    deps: Deps, start_worker: Any, monkeypatch: Any
) -> None:
    """A bug that kills a thread's lane loses nothing: the entry stays in the stream and the sweep applies it."""
    from bot.worker import Worker

    process, broken = Worker._process, {"left": 1}

    async def crash_once(self: Worker, lane: Any, item: Any) -> Any:
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("a bug in the lane")
        return await process(self, lane, item)

    monkeypatch.setattr(Worker, "_process", crash_once)
    await start_worker()
    accepted = await control.launch(deps, "refund-desk", "refund A100 25", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=10)
    assert broken["left"] == 0
    assert [e.type for e in thread.events].count("message.received") == 1
    assert await deps.redis.xlen(deps.keys.inbound_for(accepted.thread_id)) == 0
