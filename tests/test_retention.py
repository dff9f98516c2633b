"""Retention: finished threads past their time are deleted with everything kept for them (archived first if
asked); nothing still going on, nothing that moved meanwhile, and one sweeper at a time. Time is passed in, not
waited for: each thread is written with the last-activity score a real commit at that time would give it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bot import approvals, codec, control, retention, threads
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    ChannelRef,
    Event,
    HumanAsked,
    MessageReceived,
    Reply,
    ThreadCancelled,
    ThreadFailed,
    ThreadLaunched,
    ThreadPaused,
    ToolCall,
    ToolResult,
    parse_event,
)
from bot.outbox import Outbound, OutboxConsumer, Receipt
from bot.retention import DAY_MS, Finished, Sweeper, Tally
from bot.runtime import Deps
from bot.threads import Status
from channels.email.delivery import THREAD_KEY_SUFFIXES, last_in_key, remember
from tests.conftest import status_is, wait_for
from tests.test_cli import handrail
from tests.test_email import ALICE as ALICE_MAIL
from tests.test_email import BOT, approval_mail
from tests.test_email import mail as email_rig  # noqa: F401  (a fixture: Dovecot, SMTP, watcher, delivery)

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")
EMAIL_KEYS = THREAD_KEY_SUFFIXES


def sweeper(deps: Deps) -> Sweeper:
    return Sweeper(deps.redis, deps.keys, EMAIL_KEYS, page=2)  # small pages: every test crosses a page boundary


async def now(deps: Deps) -> int:
    return await retention.redis_now(deps.redis)


async def seed(deps: Deps, tid: str, events: Sequence[Event], at: int) -> None:
    """Write a thread as the worker's commits would have: its log, and its index entry scored ``at``."""
    pipe = deps.redis.pipeline(transaction=True)
    for e in events:
        pipe.xadd(deps.keys.log(tid), {"e": codec.encode(e)})
    pipe.zadd(deps.keys.threads, {tid: at})
    await pipe.execute()


def convo(tid: str, *tail: Event) -> list[Event]:
    return [ThreadLaunched(thread_id=tid, agent="refund-desk", ref=ALICE),
            MessageReceived(thread_id=tid, text="hello", user=ALICE.user, ref=ALICE), *tail]  # fmt: skip


def done(tid: str) -> list[Event]:
    return convo(tid, Reply(thread_id=tid, text="bye"))


async def keys_of(deps: Deps, *names: str) -> list[str]:
    """Every key of the test's namespace that names one of ``names``."""
    found = [k.decode() async for k in deps.redis.scan_iter(match=f"{deps.keys.ns}:*", count=1000)]
    return sorted(k for k in found if any(n in k for n in names))


async def exists(deps: Deps, tid: str) -> bool:
    return bool((await threads.load(deps.redis, deps.keys, tid)).events)


# -- what goes, what stays ---------------------------------------------------------------------------------------


async def test_a_done_thread_past_retention_goes_with_every_key_it_owns(deps: Deps, start_worker: Any) -> None:
    """A real refund thread (approval, receipt, mail references) 31 days after its reply: nothing of it is left."""
    await start_worker()
    tid = (await control.launch(deps, "refund-desk", "refund A100 25", ALICE)).thread_id
    request = (await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))).open_approval()
    assert request is not None
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    await wait_for(deps, tid, status_is(Status.DONE))

    async def delivered(msg: Outbound) -> Receipt:
        return Receipt(channel_id=f"sent-{msg.id}")

    consumer = OutboxConsumer(deps.redis, deps.keys, "terminal", delivered)
    await consumer.ensure_group()
    assert await consumer.run_once(block_ms=10) == 3  # approval card, its update, the reply: three receipts
    await remember(deps, tid, "<m1@example.org>")
    await deps.redis.set(last_in_key(deps, tid), "<m0@example.org>")
    mine = await keys_of(deps, tid, request.approval_id)
    assert {deps.keys.log(tid), deps.keys.receipts(tid), deps.keys.approval(request.approval_id),
            deps.keys.thread_key(tid, "email:refs"), last_in_key(deps, tid),
            deps.keys.seen(f"launch:{tid}")} <= set(mine)  # fmt: skip

    tally = await sweeper(deps).sweep(now_ms=await now(deps) + 31 * DAY_MS, older_than_ms=30 * DAY_MS)

    assert (tally.examined, tally.expired) == (1, 1)
    left = await keys_of(deps, tid, request.approval_id)
    # only repeat checks of single events remain, and they expire on their own
    assert [k for k in left if await deps.redis.ttl(k) < 0] == []
    assert not [k for k in left if f"{{t:{tid}}}" in k or ":ap:" in k or "launch:" in k], left
    assert await deps.redis.zscore(deps.keys.threads, tid) is None
    assert await threads.recent_ids(deps.redis, deps.keys) == []


async def test_threads_still_going_on_stay_however_old_and_finished_ones_go_only_when_due(deps: Deps) -> None:
    t = await now(deps)
    old, recent = t - 40 * DAY_MS, t - 5 * DAY_MS
    staying = {
        "asked": convo("asked", HumanAsked(thread_id="asked", question="which order?")),
        "paused": [*done("paused")[:2], ThreadPaused(thread_id="paused", by="terminal:bob")],
        "running": convo("running"),
        "gated": convo("gated", ApprovalRequested(thread_id="gated", approval_id="ap1", call_id="ap1",
                       tool="issue_refund", args={}, args_hash="h", approvers=["terminal:alice"])),
    }  # fmt: skip
    going = {
        "done": done("done"),
        "failed": convo("failed", ThreadFailed(thread_id="failed", reason="no model")),
        "cancelled": convo("cancelled", ThreadCancelled(thread_id="cancelled", by="terminal:bob")),
    }
    for tid, events in (staying | going).items():
        await seed(deps, tid, events, old)
    await seed(deps, "fresh-done", done("fresh-done"), recent)

    tally = await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS)

    assert tally == Tally(examined=7, expired=3, kept=4, moved=0)
    assert {tid: await exists(deps, tid) for tid in [*staying, *going, "fresh-done"]} == {
        **{tid: True for tid in staying}, **{tid: False for tid in going}, "fresh-done": True,
    }  # fmt: skip
    # ten days later the fresh one is due as well; the ones still going on were looked at once and are not re-read
    tally = await sweeper(deps).sweep(now_ms=t + 30 * DAY_MS, older_than_ms=30 * DAY_MS)
    assert tally == Tally(examined=1, expired=1)
    assert not await exists(deps, "fresh-done")


async def test_a_thread_that_moves_again_is_no_longer_finished_and_its_clock_restarts(deps: Deps) -> None:
    t = await now(deps)
    await seed(deps, "reopened", done("reopened"), t - 40 * DAY_MS)
    assert await sweeper(deps).sweep(now_ms=t - 20 * DAY_MS, older_than_ms=30 * DAY_MS) == Tally()
    # a new message 15 days ago: running again, and 15 days is not 30
    await seed(deps, "reopened", [MessageReceived(thread_id="reopened", text="one more thing")], t - 15 * DAY_MS)
    await seed(deps, "reopened", [Reply(thread_id="reopened", text="done")], t - 15 * DAY_MS)
    assert await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS) == Tally()
    assert await exists(deps, "reopened")
    tally = await sweeper(deps).sweep(now_ms=t + 16 * DAY_MS, older_than_ms=30 * DAY_MS)
    assert (tally.expired, await exists(deps, "reopened")) == (1, False)


async def test_an_event_committed_after_the_sweep_read_the_log_keeps_the_thread(deps: Deps) -> None:
    """The archive step runs between reading a log and deleting it: a commit landing there must win."""
    t = await now(deps)
    await seed(deps, "racing", done("racing"), t - 40 * DAY_MS)
    await seed(deps, "quiet", done("quiet"), t - 40 * DAY_MS)

    async def meanwhile_a_message_arrives(page: Sequence[Finished]) -> None:
        await seed(deps, "racing", [MessageReceived(thread_id="racing", text="wait, one more")], t)

    tally = await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS, archive=meanwhile_a_message_arrives)

    assert tally == Tally(examined=2, expired=1, moved=1)
    racing = await threads.load(deps.redis, deps.keys, "racing")
    assert racing.status is Status.RUNNING and len(racing.events) == 4
    assert await deps.redis.zscore(deps.keys.threads, "racing") == t
    assert not await exists(deps, "quiet")


async def test_a_message_still_on_the_inbound_stream_keeps_its_done_thread(deps: Deps) -> None:
    """Accepted but not yet applied (no worker is running): deleting the thread now would lose the message."""
    t = await now(deps)
    await seed(deps, "awaited", done("awaited"), t - 40 * DAY_MS)
    await control.send(deps, "awaited", "are you there?", ALICE)

    tally = await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS)

    assert tally == Tally(examined=1, moved=1)
    assert await exists(deps, "awaited")
    # once the worker has applied it the thread is running again; were the message ignored instead, the thread
    # would still be finished, so the next sweep looks at it again (the cursor did not pass it)
    await deps.redis.delete(deps.keys.inbound_for("awaited"))
    assert (await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS)).expired == 1


async def test_a_quiet_unfinished_thread_keeps_only_the_approval_records_still_needed(deps: Deps) -> None:
    """Rejected, or approved and run: only a late decider reads those records. Approved but not run yet
    (the thread was paused): the executor's gate still needs it."""
    tid, t = "waiting", await now(deps)

    def gated(call_id: str) -> list[Event]:
        return [ToolCall(thread_id=tid, call_id=call_id, tool="issue_refund", args={}),
                ApprovalRequested(thread_id=tid, approval_id=call_id, call_id=call_id, tool="issue_refund", args={},
                                  args_hash="h", approvers=["terminal:alice"])]  # fmt: skip

    events = convo(
        tid,
        *gated("ran"), ApprovalDecided(thread_id=tid, approval_id="ran", approved=True, by="terminal:alice"),
        ToolResult(thread_id=tid, call_id="ran", ok=True, result={}),
        *gated("no"), ApprovalDecided(thread_id=tid, approval_id="no", approved=False, by="terminal:alice"),
        ThreadPaused(thread_id=tid),
        *gated("yes"), ApprovalDecided(thread_id=tid, approval_id="yes", approved=True, by="terminal:alice"),
    )  # fmt: skip
    await seed(deps, tid, events, t - 40 * DAY_MS)
    for aid, state in [("ran", "approved"), ("no", "rejected"), ("yes", "approved")]:
        await deps.redis.hset(deps.keys.approval(aid), mapping={"thread_id": tid, "tool": "issue_refund",
                                                                 "state": state, "by": "terminal:alice"})  # fmt: skip

    assert await sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS) == Tally(examined=1, kept=1)

    assert await exists(deps, tid)
    assert (await approvals.get(deps.redis, deps.keys, "yes")).state == "approved"
    assert await keys_of(deps, ":ap:ran", ":ap:no") == []


# -- archive, purge and dead letters from the command line -------------------------------------------------------


async def test_threads_archive_writes_json_lines_then_deletes_and_keeps_what_goes_on(
    deps: Deps, env_for: Any, tmp_path: Path
) -> None:
    t = await now(deps)
    seeded = {f"old-{i}": done(f"old-{i}") for i in range(3)}
    for i, (tid, events) in enumerate(seeded.items()):
        await seed(deps, tid, events, t - (40 - i) * DAY_MS)
    await seed(deps, "asking", convo("asking", HumanAsked(thread_id="asking", question="which?")), t - 40 * DAY_MS)
    target = tmp_path / "archive.jsonl"

    out = await handrail(env_for(), "threads", "archive", "--older-than", "30", "--to", str(target))

    assert out.returncode == 0, out.stderr
    assert "3 deleted, 1 still going on" in out.stdout and f"3 archived to {target}" in out.stdout
    assert "examined" in out.stderr  # progress, page by page
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["thread_id"], r["status"], r["agent"]) for r in lines] == [
        (f"old-{i}", "done", "refund-desk") for i in range(3)
    ]
    assert [parse_event(e) for e in lines[0]["events"]] == seeded["old-0"]
    assert [await exists(deps, tid) for tid in ("old-0", "old-1", "old-2", "asking")] == [False, False, False, True]


async def test_threads_purge_asks_first_and_dlq_purge_removes_by_age_or_by_id(deps: Deps, env_for: Any) -> None:
    t = await now(deps)
    await seed(deps, "old", done("old"), t - 40 * DAY_MS)
    refused = await handrail(env_for(), "threads", "purge", stdin="n\n")
    assert refused.returncode != 0 and await exists(deps, "old")
    purged = await handrail(env_for(), "threads", "purge", "--yes")
    assert purged.returncode == 0 and "1 deleted" in purged.stdout and not await exists(deps, "old")

    dlq = deps.keys.dlq
    ancient = await deps.redis.xadd(dlq, {"stream": "in", "error": "boom"}, id=f"{t - 10 * DAY_MS}-0")
    recent = [(await deps.redis.xadd(dlq, {"stream": "in", "error": "boom"})).decode() for _ in range(2)]
    assert ancient.decode() == f"{t - 10 * DAY_MS}-0"

    neither = await handrail(env_for(), "dlq", "purge")
    assert neither.returncode != 0 and "either dead-letter ids or --older-than" in neither.stderr
    by_age = await handrail(env_for(), "dlq", "purge", "--older-than", "7")
    assert by_age.returncode == 0 and "purged 1 dead letter" in by_age.stdout
    unknown = await handrail(env_for(), "dlq", "purge", recent[0], "1-0")
    assert unknown.returncode != 0 and "no dead letter 1-0" in unknown.stderr and "nothing purged" in unknown.stderr
    assert await deps.redis.xlen(dlq) == 2
    by_id = await handrail(env_for(), "dlq", "purge", recent[0])
    assert by_id.returncode == 0 and "purged 1 dead letter" in by_id.stdout
    assert [i.decode() for i, _ in await deps.redis.xrange(dlq)] == recent[1:]


# -- one sweeper at a time ---------------------------------------------------------------------------------------


async def test_a_second_sweep_waits_for_the_lease_and_two_unleased_sweeps_delete_each_thread_once(
    deps: Deps,
) -> None:
    async with retention.sweeping(deps.redis, deps.keys):
        with pytest.raises(retention.Busy, match="already running"):
            async with retention.sweeping(deps.redis, deps.keys):
                pass
    async with retention.sweeping(deps.redis, deps.keys):  # released: free again
        pass

    t = await now(deps)
    for i in range(6):
        await seed(deps, f"d{i}", done(f"d{i}"), t - 40 * DAY_MS)
    tallies = await asyncio.gather(
        *(sweeper(deps).sweep(now_ms=t, older_than_ms=30 * DAY_MS) for _ in range(2))
    )
    assert sum(x.expired for x in tallies) == 6  # each once; the other saw it gone
    assert await keys_of(deps, "{t:d") == []


async def test_the_periodic_sweeper_runs_once_per_period_across_processes(deps: Deps) -> None:
    """Two processes' sweepers: the old done thread goes, and the due marker keeps it to one sweep a period."""
    await seed(deps, "stale", done("stale"), await now(deps) - 2 * DAY_MS)
    stop = asyncio.Event()
    runners = [
        asyncio.create_task(retention.run_sweeper(sweeper(deps), stop, retention_days=1, every_s=600))
        for _ in range(2)
    ]
    try:
        for _ in range(200):
            if not await exists(deps, "stale"):
                break
            await asyncio.sleep(0.02)
        assert not await exists(deps, "stale")
        assert 0 < await deps.redis.pttl(deps.keys.retention_due) <= 600_000
        assert await deps.redis.get(deps.keys.retention_lease) is None  # released after the sweep
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runners), 5)


async def test_retention_zero_keeps_everything(deps: Deps) -> None:
    stop = asyncio.Event()
    await seed(deps, "stale", done("stale"), 1)
    await asyncio.wait_for(retention.run_sweeper(sweeper(deps), stop, retention_days=0, every_s=10), 1)
    assert await exists(deps, "stale")


# -- the email channel's notices (S14) ---------------------------------------------------------------------------


async def test_a_notice_about_a_refused_reply_to_no_thread_leaves_no_key_that_never_expires(email_rig: Any) -> None:  # noqa: F811
    """An approver's reply to the bare address is refused with a notice; the notice's pseudo-thread keeps no
    receipt, reference list or token, so a stream of such replies cannot grow Redis for good."""
    mail = email_rig
    deps = mail.deps
    _, request = await approval_mail(mail)

    async def lasting() -> set[str]:
        found = [k async for k in deps.redis.scan_iter(match=f"{deps.keys.ns}:*", count=1000)]
        return {k.decode() for k in found if await deps.redis.ttl(k) == -1}

    before = await lasting()
    await mail.send(ALICE_MAIL, BOT, "approve", subject="Re: x", headers={"In-Reply-To": str(request["Message-ID"])})
    _, note = await mail.mails(ALICE_MAIL, 2)
    assert "not taken as a decision" in note.get_content()
    for _ in range(100):  # the receipt (if any) is written just after the mail went out
        if not await deps.redis.xlen(deps.keys.outbox("email")):
            break
        await asyncio.sleep(0.02)
    assert await lasting() - before == set()
    assert await keys_of(deps, "{t:email-notice-") == []
