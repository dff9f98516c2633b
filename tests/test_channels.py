"""Channels behind one protocol: found through entry points, routed through one receive() in the core."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from bot import channel, control
from bot.channel import BaseChannel, Role, Runner
from bot.events import ChannelRef, Event, HumanAnswered, HumanAsked, MessageReceived
from bot.outbox import Outbound
from bot.runtime import Deps
from bot.threads import Status, Thread
from tests.conftest import ROOT, python, status_is, wait_for
from tests.scripted_model import ScriptedModel, call

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


def test_the_shipped_channels_are_registered_through_entry_points() -> None:
    found = channel.registered()
    assert sorted(found) == ["api", "console", "email", "mcp", "schedule", "slack", "terminal", "webhook"]
    # not "api" nor "console": they read the thread logs, so nothing is queued for them
    assert channel.delivered() == frozenset({"email", "slack", "terminal", "webhook"})
    assert all(found[name].name == name for name in found)


def test_the_core_imports_no_channel() -> None:
    """Every module under bot/ loads without importing anything from channels/ (the wiring finds them later)."""
    modules = sorted(p.stem for p in (ROOT / "bot").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('bot.' + m)\n"
        "print(sorted(m for m in sys.modules if m == 'channels' or m.startswith('channels.')))\n"
    )
    out = subprocess.run([python(), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


class Fax(BaseChannel):
    """A channel from another package: it hears of every approval request and queues a fax for it."""

    name = "fax"

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        return [self.run] if role == "worker" else []

    async def run(self, stop: Any) -> None:
        await stop.wait()

    def notify(self, deps: Deps, thread: Thread, event: Event) -> Sequence[tuple[str, Outbound]]:
        if event.type != "approval.requested":
            return []
        ref = ChannelRef(kind=self.name, address="+49 30 1234")
        return [("fax", Outbound(id=event.id, thread_id=thread.id, ref=ref, kind="text", text="approval needed"))]


@pytest.fixture
def with_fax(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = dict(channel.registered())
    monkeypatch.setattr(channel, "registered", lambda: {**shipped, "fax": Fax()})


async def test_a_channel_from_another_package_hears_events_and_runs_in_the_worker(
    deps: Deps, start_worker: Any, with_fax: None
) -> None:
    assert len(channel.runners(deps, "worker", ["fax"])) == 1
    await start_worker()
    accepted = await control.launch(deps, "refund-desk", "refund A100 25", ALICE)
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    [(_, fields)] = await deps.redis.xrange(deps.keys.outbox("fax"))
    sent = Outbound.model_validate_json(fields[b"m"])
    assert (sent.thread_id, sent.text, sent.ref.address) == (accepted.thread_id, "approval needed", "+49 30 1234")


async def test_nothing_is_queued_for_a_kind_nobody_delivers(deps: Deps, start_worker: Any) -> None:
    api_caller = ChannelRef(kind="api", address="ops", user="api:ops")
    await start_worker()
    accepted = await control.launch(deps, "refund-desk", "refund A100 25", api_caller)
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    assert await deps.redis.exists(deps.keys.outbox("api")) == 0  # it would only ever grow


async def test_a_reply_that_arrives_before_its_launch_is_applied_is_kept(deps: Deps, start_worker: Any) -> None:
    """Slack and email replies seconds after the first message: the thread exists only on the stream yet."""
    tid = "side-door-1"
    first = await control.receive(deps, tid, "refund A100 25", ALICE, key="m1")
    assert first is not None
    reply = await control.receive(deps, tid, "actually, refund A101 5", ALICE, key="m2", start=False)
    assert reply is not None and not reply.duplicate, "published, not dropped"
    assert await control.receive(deps, "never-seen", "hello?", ALICE, key="m3", start=False) is None
    await start_worker()
    thread = await wait_for(deps, tid, lambda t: [e.type for e in t.events].count("message.received") == 2)
    assert [e.text for e in thread.events if isinstance(e, MessageReceived)] == [  # type: ignore[attr-defined]
        "refund A100 25", "actually, refund A101 5"
    ]  # fmt: skip


async def test_a_message_to_a_thread_waiting_on_a_human_is_its_answer(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    """The worker decides, in order: the channel cannot know whether the question was asked by the time it lands."""
    model.add(call("ask_human", {"question": "Which order?"}), call("reply", {"text": "Thanks, A100 it is."}))
    await start_worker()
    accepted = await control.launch(deps, "support", "I want a refund", ALICE)
    await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_HUMAN), timeout=20)
    await control.receive(deps, accepted.thread_id, "A100", ALICE, key="answer-1", start=False)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=20)
    asked = next(i for i, e in enumerate(thread.events) if isinstance(e, HumanAsked))
    answer = thread.events[asked + 1]
    assert isinstance(answer, HumanAnswered) and (answer.text, answer.by) == ("A100", "terminal:alice")
    assert "<human_answered>" in str(model.requests[-1]["messages"][1]["content"])


async def test_receive_names_what_is_missing(deps: Deps, env_for: Any) -> None:
    from tests.test_cli import failed_cleanly, handrail

    env = {k: v for k, v in env_for().items() if not k.startswith(("IMAP_", "SMTP_", "EMAIL_"))}
    installed = "no channel 'fax'; installed: api, console, email, mcp, schedule"
    failed_cleanly(await handrail(env, "receive", "fax"), installed)
    failed_cleanly(await handrail(env, "receive", "email"), "email is not configured: set IMAP_HOST")
    failed_cleanly(await handrail(env, "email"), "email is not configured: set IMAP_HOST")  # the old name
