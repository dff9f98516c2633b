"""Approvals nobody decides in time expire: once, however many expirers run; the agent is told; nobody can approve
the call afterwards, by any path; records from before expiry existed get the default expiry."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bot import approvals, control, expiry
from bot.agent import DEFAULT_EXPIRY
from bot.config import load_config
from bot.errors import ConfigError
from bot.events import ApprovalDecided, ChannelRef, Reply, ToolResult
from bot.runtime import Deps
from bot.settings import Settings
from bot.threads import Status
from tests.conftest import ROOT, status_is, wait_for

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, config_path=ROOT / "tests" / "config" / "expiry.yaml")


async def waiting_approval(deps: Deps) -> tuple[str, approvals.ApprovalRecord]:
    accepted = await control.launch(deps, "refund-desk", "refund A100", ALICE)
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    [record] = await approvals.pending(deps.redis, deps.keys)
    return accepted.thread_id, record


async def test_an_approval_nobody_decides_expires_once_and_the_agent_tells_the_user(
    deps: Deps, start_worker: Any
) -> None:
    await start_worker()
    tid, record = await waiting_approval(deps)
    assert record.expires_at - record.requested_at == 2000
    stop = asyncio.Event()
    expirers = [asyncio.create_task(expiry.run_expirer(deps, stop, every=0.02)) for _ in range(3)]
    try:
        thread = await wait_for(deps, tid, status_is(Status.DONE), timeout=10)
    finally:
        stop.set()
        await asyncio.gather(*expirers)
    decided = [e for e in thread.events if isinstance(e, ApprovalDecided)]
    assert [(d.approved, d.expired, d.by, d.feedback) for d in decided] == [
        (False, True, approvals.EXPIRED_BY, "nobody decided within 2 seconds")
    ]
    assert decided[0].at >= record.expires_at - 50  # not before its time (clocks of one machine)
    result = next(e for e in thread.events if isinstance(e, ToolResult) and e.call_id == record.call_id)
    assert not result.ok and result.error == "approval expired: nobody decided within 2 seconds"
    reply = thread.events[-1]
    assert isinstance(reply, Reply) and reply.text.startswith("I did not refund it: the approval expired")
    assert await deps.redis.hgetall(f"{deps.keys.ns}:refunds") == {}, "the refund never ran"
    assert await approvals.pending(deps.redis, deps.keys) == []

    late = await control.decide(deps, record.id, by="terminal:alice", approved=True)
    assert (late.result, late.state) == ("decided", "expired") and late.message.startswith("already expired by")


async def test_past_its_time_nobody_can_approve_even_before_the_expirer_has_run(
    deps: Deps, start_worker: Any
) -> None:
    await start_worker()
    tid, record = await waiting_approval(deps)
    early = await expiry.expire_due(deps)
    assert early == 0 and (await approvals.get(deps.redis, deps.keys, record.id)).state == "pending"
    await asyncio.sleep(2.1)
    refused = await control.decide(deps, record.id, by="api:ops", approved=True)
    assert (refused.result, refused.state) == ("decided", "expired")
    assert refused.message.startswith("already expired at ")
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))  # the decision changed nothing
    assert not any(isinstance(e, ApprovalDecided) for e in thread.events)
    assert await expiry.expire_due(deps) == 1
    assert await expiry.expire_due(deps) == 0, "expired once"
    await wait_for(deps, tid, status_is(Status.DONE))


async def test_a_record_from_before_expiry_existed_gets_the_default_expiry(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    _, record = await waiting_approval(deps)
    # as written by the version before: no expires_at, scored by when it was requested
    await deps.redis.hdel(deps.keys.approval(record.id), "expires_at")
    await deps.redis.zadd(deps.keys.pending_approvals, {record.id: record.requested_at})
    assert await expiry.expire_due(deps) == 0
    after = await approvals.get(deps.redis, deps.keys, record.id)
    assert after.state == "pending" and after.expires_at == record.requested_at + int(DEFAULT_EXPIRY * 1000)
    assert await deps.redis.zscore(deps.keys.pending_approvals, record.id) == after.expires_at
    ok = await control.decide(deps, record.id, by="terminal:alice", approved=True)
    assert ok.result == "ok"


@pytest.mark.parametrize("value", ["0", "-5", "'soon'", "40000000"])
def test_an_expiry_that_is_not_a_positive_time_within_a_year_is_refused_naming_the_key(
    tmp_path: Path, value: str
) -> None:
    text = (ROOT / "tests" / "config" / "expiry.yaml").read_text()
    text = text.replace("expires_after: 2", f"expires_after: {value}")
    path = tmp_path / "handrail.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, ROOT / "prompts")
    assert "expires_after" in str(err.value)


def test_channels_show_an_expiry_as_expired_not_as_a_rejection() -> None:
    from channels.mcp.outcome import decision
    from channels.slack.cards import verdict

    update = {"id": "ap1", "approved": False, "by": approvals.EXPIRED_BY, "at": 1_700_000_000_000,
              "feedback": "nobody decided within 7 days", "expired": True}  # fmt: skip
    shown = verdict(update)
    assert shown.startswith(":hourglass: Expired at ")
    assert shown.endswith(": nobody decided within 7 days; nothing ran.")
    assert "Rejected" not in shown and approvals.EXPIRED_BY not in shown
    events = [ApprovalDecided(thread_id="t", approval_id="ap1", approved=False, by=approvals.EXPIRED_BY,
                              feedback="nobody decided within 7 days", expired=True)]  # fmt: skip
    got = decision("t", events)
    assert (got.status, got.feedback) == ("expired", "nobody decided within 7 days")


async def test_a_record_that_cannot_be_read_holds_up_no_other_expiry(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    tid, record = await waiting_approval(deps)
    await deps.redis.hset(deps.keys.approval("broken"), mapping={"thread_id": tid, "requested_at": "soon"})
    await deps.redis.zadd(deps.keys.pending_approvals, {"broken": 0})  # first in line
    await asyncio.sleep(2.1)
    assert await expiry.expire_due(deps) == 1
    assert (await approvals.get(deps.redis, deps.keys, record.id)).state == "expired"
    await wait_for(deps, tid, status_is(Status.DONE))


async def test_a_failed_round_of_the_expirer_is_followed_by_the_next(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds: list[int] = []

    async def failing_first(d: Deps, *, limit: int = expiry.BATCH) -> int:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise ValueError("settings went stale")  # any failure but Redis's own
        return 0

    monkeypatch.setattr(expiry, "expire_due", failing_first)
    stop = asyncio.Event()
    task = asyncio.create_task(expiry.run_expirer(deps, stop, every=0.01))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(rounds) > 2, "the expirer stopped after a failed round"
