"""Slack end to end: the real Bolt app over HTTP, requests signed as Slack signs them, a local fake Web API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from bot import approvals, threads
from bot.events import ChannelRef
from bot.outbox import Outbound, outbox_command
from bot.runtime import Deps
from bot.threads import Status, Thread
from channels.slack.delivery import deliver_slack
from tests.conftest import status_is, wait_for, web_client
from tests.slack_fake import Call, FakeSlack

SECRET = "slack-signing-secret-test-only"
TOKEN = "xoxb-test-only-not-a-token"


def signed(body: bytes, *, secret: str = SECRET, stamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if stamp is None else stamp)
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}


@dataclass
class Rig:
    http: httpx.AsyncClient
    fake: FakeSlack
    deps: Deps
    n: int = 0

    async def event(self, event: dict[str, Any], *, event_id: str | None = None, retry: int = 0) -> httpx.Response:
        self.n += 1
        body = json.dumps({
            "token": "legacy", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
            "event_id": event_id or f"Ev{self.n:04d}", "event_time": int(time.time()), "event": event,
        }).encode()  # fmt: skip
        headers = signed(body) | {"Content-Type": "application/json"}
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.http.post("/slack/events", content=body, headers=headers)

    async def form(self, fields: dict[str, str]) -> httpx.Response:
        body = urlencode(fields).encode()
        headers = signed(body) | {"Content-Type": "application/x-www-form-urlencoded"}
        return await self.http.post("/slack/events", content=body, headers=headers)

    async def click(self, action: str, approval_id: str, user: str, card: Call) -> httpx.Response:
        return await self.form({"payload": json.dumps({
            "type": "block_actions", "user": {"id": user, "team_id": "T1"}, "team": {"id": "T1"},
            "api_app_id": "A1", "trigger_id": f"trig-{user}", "channel": {"id": card.params["channel"]},
            "container": {"type": "message", "message_ts": "x", "channel_id": card.params["channel"]},
            "message": {"ts": "1700000500.000001", "thread_ts": card.params.get("thread_ts")},
            "actions": [{"type": "button", "action_id": action, "block_id": f"approval:{approval_id}",
                         "value": approval_id, "action_ts": str(time.time())}],
        })})  # fmt: skip

    async def submit(self, view: dict[str, Any], user: str, values: dict[str, Any]) -> httpx.Response:
        return await self.form({"payload": json.dumps({
            "type": "view_submission", "user": {"id": user, "team_id": "T1"}, "team": {"id": "T1"},
            "api_app_id": "A1", "trigger_id": "trig-view",
            "view": {"id": "V1", "type": "modal", "callback_id": view["callback_id"],
                     "private_metadata": view["private_metadata"], "state": {"values": values}},
        })})  # fmt: skip

    async def calls(self, method: str, until: Callable[[list[Call]], bool], timeout: float = 10.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            made = self.fake.made(method)
            if until(made):
                return made
            await asyncio.sleep(0.02)
        raise AssertionError(f"{method} calls never got there: {[c.params for c in self.fake.made(method)]}")

    async def posted(self, count: int) -> list[Call]:
        return await self.calls("chat.postMessage", lambda c: len(c) >= count)


@contextlib.asynccontextmanager
async def rig(deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any) -> AsyncIterator[Rig]:
    """The web app (Slack at /slack/events) on a free port, a worker, the Slack deliverer and a fake Web API."""
    fake = FakeSlack()
    await fake.start()
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("SLACK_API_URL", fake.url)
    await start_worker()
    stop = asyncio.Event()
    delivery = asyncio.create_task(deliver_slack(deps, stop, base_delay=0.05))
    try:
        async with web_client(deps) as http:
            yield Rig(http, fake, deps)
    finally:
        stop.set()
        await delivery
        await fake.stop()


@pytest.fixture
async def slack(deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any) -> AsyncIterator[Rig]:
    async with rig(deps, monkeypatch, start_worker) as r:
        yield r


def mention(text: str, ts: str = "1700000000.000100", channel: str = "CGEN", user: str = "UBOB") -> dict[str, Any]:
    return {"type": "app_mention", "user": user, "text": f"<@UBOT> {text}", "ts": ts, "channel": channel,
            "event_ts": ts, "team": "T1"}  # fmt: skip


def tid(ts: str = "1700000000.000100", channel: str = "CGEN") -> str:
    return f"slack-T1-{channel}-{ts}"


async def approval_card(rig: Rig, text: str = "refund A100 25") -> tuple[str, Call]:
    """Mention the bot asking for a refund; returns the approval id and the card's chat.postMessage."""
    r = await rig.event(mention(text))
    assert r.status_code == 200, r.text
    thread = await wait_for(rig.deps, tid(), status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    [card] = await rig.posted(1)
    return request.approval_id, card


async def receipts_of(deps: Deps, thread_id: str) -> dict[bytes, bytes]:
    """The thread's receipts once there are some (kept just after Slack answers)."""
    for _ in range(500):
        if receipts := await deps.redis.hgetall(deps.keys.receipts(thread_id)):
            return receipts
        await asyncio.sleep(0.02)
    raise AssertionError(f"no receipts for {thread_id}")


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": True}}


def count(thread: Thread, type_: str) -> int:
    return sum(1 for e in thread.events if e.type == type_)


# -- conversations ----------------------------------------------------------------------------------------------


async def test_a_mention_is_answered_in_its_thread(slack: Rig) -> None:
    r = await slack.event(mention("hello"))
    assert r.status_code == 200
    # Slack also sends the mention as a plain channel message (another event id): it is the same message
    echo = mention("hello") | {"type": "message", "channel_type": "channel"}
    assert (await slack.event(echo)).status_code == 200
    [reply] = await slack.posted(1)
    assert reply.params.pop("metadata")["event_type"] == "handrail_outbox"
    assert reply.params == {
        "channel": "CGEN", "thread_ts": "1700000000.000100",
        "text": "I can refund orders. Say 'refund A100' for the whole order or 'refund A100 25' for $25.",
    }  # fmt: skip
    thread = await threads.get(slack.deps.redis, slack.deps.keys, tid())
    said = next(e for e in thread.events if e.type == "message.received")
    assert (said.text, said.user, thread.agent) == ("hello", "slack:T1:UBOB", "slack-desk")  # type: ignore[union-attr]
    assert count(thread, "message.received") == 1
    assert [c.method for c in slack.fake.calls if c.method != "auth.test"] == ["chat.postMessage"]


async def test_a_direct_message_is_answered_and_bot_messages_are_ignored(slack: Rig) -> None:
    dm = {"type": "message", "channel_type": "im", "channel": "D42", "user": "UBOB", "text": "hi",
          "ts": "1700000001.000100", "team": "T1"}  # fmt: skip
    assert (await slack.event(dm)).status_code == 200
    [reply] = await slack.posted(1)
    assert (reply.params["channel"], reply.params["thread_ts"]) == ("D42", "1700000001.000100")
    in_thread = {"thread_ts": "1700000001.000100"}
    # another bot's message and our own echo, in the same thread: neither is heard
    await slack.event(dm | in_thread | {"ts": "1700000002.0", "bot_id": "BOTHER", "subtype": "bot_message"})
    await slack.event(dm | in_thread | {"ts": "1700000003.0", "user": "UBOT", "bot_id": "BBOT"})
    await slack.event(dm | in_thread | {"ts": "1700000004.0", "text": "refund A101"})
    await wait_for(slack.deps, tid("1700000001.000100", "D42"), status_is(Status.WAITING_APPROVAL))
    thread = await threads.get(slack.deps.redis, slack.deps.keys, tid("1700000001.000100", "D42"))
    assert [e.text for e in thread.events if e.type == "message.received"] == ["hi", "refund A101"]  # type: ignore[union-attr]


async def test_a_question_is_asked_in_the_thread_and_the_next_reply_answers_it(slack: Rig, model: Any) -> None:
    from tests.scripted_model import call

    model.add(call("ask_human", {"question": "Which order?"}), call("reply", {"text": "Looking at A100."}))
    await slack.event(mention("refund please", channel="CSUPPORT"))
    [question] = await slack.posted(1)
    assert (question.params["text"], question.params["thread_ts"]) == ("Which order?", "1700000000.000100")
    await wait_for(slack.deps, tid(channel="CSUPPORT"), status_is(Status.WAITING_HUMAN), timeout=30)
    reply = {"type": "message", "channel_type": "channel", "channel": "CSUPPORT", "user": "UBOB", "text": "A100",
             "ts": "1700000009.000100", "thread_ts": "1700000000.000100", "team": "T1"}  # fmt: skip
    await slack.event(reply)
    thread = await wait_for(slack.deps, tid(channel="CSUPPORT"), status_is(Status.DONE), timeout=30)
    answered = next(e for e in thread.events if e.type == "human.answered")
    assert (answered.text, answered.by) == ("A100", "slack:T1:UBOB")  # type: ignore[union-attr]
    assert (await slack.posted(2))[1].params["text"] == "Looking at A100."


# -- approvals --------------------------------------------------------------------------------------------------


async def test_an_approver_approves_with_the_button_and_the_card_is_updated(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    assert card.params["channel"] == "CGEN" and card.params["thread_ts"] == "1700000000.000100"
    assert card.params["blocks"] == [
        section(":raised_hand: Approval needed to run *issue_refund*"),
        section("*order_id*\n```A100```"),
        section("*amount_cents*\n```2500```"),
        section("*Why (the agent's words):*\nada@example.com asked for a refund of their mechanical keyboard"),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "Who may decide: <@UALICE>"}]},
        {"type": "actions", "block_id": f"approval:{approval_id}", "elements": [
            {"type": "button", "action_id": "handrail_approve", "value": approval_id, "style": "primary",
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": "handrail_reject", "value": approval_id, "style": "danger",
             "text": {"type": "plain_text", "text": "Reject"}},
            {"type": "button", "action_id": "handrail_edit", "value": approval_id,
             "text": {"type": "plain_text", "text": "Edit"}},
        ]},
    ]  # fmt: skip

    r = await slack.click("handrail_approve", approval_id, "UALICE", card)
    assert r.status_code == 200
    thread = await wait_for(slack.deps, tid(), status_is(Status.DONE))
    [update] = await slack.calls("chat.update", lambda c: len(c) >= 1)
    decided = next(e for e in thread.events if e.type == "approval.decided")
    assert update.params["ts"] == "1700000500.000001" and update.params["channel"] == "CGEN"
    verdict = f":white_check_mark: Approved by <@UALICE> at <!date^{decided.at // 1000}^{{time}}|"
    assert update.params["text"].startswith(verdict)
    assert update.params["blocks"][-1] == section(update.params["text"]) | {"block_id": "verdict"}
    assert not any(b["type"] == "actions" for b in update.params["blocks"])
    replies = await slack.posted(2)
    assert replies[1].params["text"].startswith("Refunded $25.00 on order A100")
    assert count(thread, "tool.started") == 3 - 1  # lookup_order and issue_refund, each once
    assert len(await slack.deps.redis.hgetall(f"{slack.deps.keys.ns}:refunds")) == 1

    # a second click, and a Slack retry of the first mention: one decision, one message, the clicker is told
    again = await slack.click("handrail_approve", approval_id, "UALICE", card)
    assert again.status_code == 200
    [told] = await slack.calls("chat.postEphemeral", lambda c: len(c) >= 1)
    assert told.params["user"] == "UALICE" and told.params["text"].startswith(
        "Already decided: approved by <@UALICE> at <!date^"
    )
    retried = await slack.event(mention("refund A100 25"), event_id="Ev0001", retry=1)
    assert retried.status_code == 200
    await asyncio.sleep(0.3)
    thread = await threads.get(slack.deps.redis, slack.deps.keys, tid())
    assert count(thread, "approval.decided") == 1 and count(thread, "message.received") == 1
    assert len(slack.fake.made("chat.update")) == 1


async def test_a_non_approver_is_refused_privately_and_nothing_changes(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    for action in ("handrail_approve", "handrail_reject", "handrail_edit"):
        assert (await slack.click(action, approval_id, "UBOB", card)).status_code == 200
    told = await slack.calls("chat.postEphemeral", lambda c: len(c) >= 3)
    assert {(c.params["user"], c.params["text"]) for c in told} == {
        ("UBOB", "You can't approve this: you are not one of its approvers.")
    }
    assert slack.fake.made("views.open") == [] and slack.fake.made("chat.update") == []
    record = await approvals.get(slack.deps.redis, slack.deps.keys, approval_id)
    thread = await threads.get(slack.deps.redis, slack.deps.keys, tid())
    assert record.state == "pending" and thread.status is Status.WAITING_APPROVAL
    assert count(thread, "approval.decided") == 0 and count(thread, "tool.started") == 1  # the lookup only


async def test_reject_asks_for_a_reason_which_reaches_the_agent(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    assert (await slack.click("handrail_reject", approval_id, "UALICE", card)).status_code == 200
    [opened] = await slack.calls("views.open", lambda c: len(c) >= 1)
    view = opened.params["view"]
    assert (opened.params["trigger_id"], view["callback_id"], view["private_metadata"]) == (
        "trig-UALICE", "handrail_reject_view", approval_id
    )  # fmt: skip
    values = {"reason": {"reason_input": {"type": "plain_text_input", "value": "they already got a voucher"}}}
    r = await slack.submit(view, "UALICE", values)
    assert r.status_code == 200 and r.content == b""
    thread = await wait_for(slack.deps, tid(), status_is(Status.DONE))
    assert count(thread, "tool.started") == 1  # the refund never ran
    replies = await slack.posted(2)
    assert replies[1].params["text"] == (
        "OK, I did not refund it. slack:UALICE rejected the refund: they already got a voucher"
    )
    [update] = await slack.calls("chat.update", lambda c: len(c) >= 1)
    assert update.params["text"] == ":x: Rejected by <@UALICE>: they already got a voucher"


async def test_edit_validates_the_new_arguments_and_runs_the_edited_call(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    await slack.click("handrail_edit", approval_id, "UALICE", card)
    [opened] = await slack.calls("views.open", lambda c: len(c) >= 1)
    view = opened.params["view"]
    shown = {b["block_id"]: b["element"]["initial_value"] for b in view["blocks"] if b["type"] == "input"}
    assert shown == {"arg:order_id": "A100", "arg:amount_cents": "2500"}

    def values(amount: str) -> dict[str, Any]:
        return {"arg:order_id": {"value": {"type": "plain_text_input", "value": "A100"}},
                "arg:amount_cents": {"value": {"type": "plain_text_input", "value": amount}}}  # fmt: skip

    bad = await slack.submit(view, "UALICE", values("-5"))
    assert bad.status_code == 200
    refusal = bad.json()
    assert refusal == {"response_action": "errors", "errors": {"arg:amount_cents": "Input should be greater than 0"}}
    assert (await approvals.get(slack.deps.redis, slack.deps.keys, approval_id)).state == "pending"

    ok = await slack.submit(view, "UALICE", values("1000"))
    assert ok.status_code == 200 and ok.content == b""
    thread = await wait_for(slack.deps, tid(), status_is(Status.DONE))
    ran = [e for e in thread.events if e.type == "tool.result"][-1]
    assert ran.result["amount_cents"] == 1000  # type: ignore[union-attr]
    assert (await slack.posted(2))[1].params["text"].startswith("Refunded $10.00 on order A100")
    [update] = await slack.calls("chat.update", lambda c: len(c) >= 1)  # the card shows the call that ran
    assert update.params["blocks"][:3] == [
        section(":pencil2: Edited call to *issue_refund*"), section("*order_id*\n```A100```"),
        section("*amount_cents*\n```1000```"),
    ]  # fmt: skip
    assert update.params["text"].startswith(":white_check_mark: Approved by <@UALICE> with edited arguments at")


def test_the_card_shows_model_written_text_literally_as_code() -> None:
    """Slack markup in arguments and reasons is escaped: a disguised link and <!channel> show as typed."""
    from channels.slack import cards

    card = cards.request_card({
        "id": "ap1", "tool": "send_link", "approvers": ["slack:T1:UALICE", "email:<x>@y"],
        "args": {"url": "<https://evil.example|https://shop.example/orders/A100>", "note": "<!channel> & `hi`"},
        "reason": "*amount_cents*\n500 <!here>",
    })  # fmt: skip
    assert card[:5] == [
        section(":raised_hand: Approval needed to run *send_link*"),
        section("*url*\n```&lt;https://evil.example|https://shop.example/orders/A100&gt;```"),
        section("*note*\n```&lt;!channel&gt; &amp; `\u200bhi`\u200b```"),
        section("*Why (the agent's words):*\n*amount_cents*\n500 &lt;!here&gt;"),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "Who may decide: <@UALICE>, email:&lt;x&gt;@y"}]},
    ]  # fmt: skip
    assert card[5]["type"] == "actions"


def test_the_card_never_cuts_silently_and_stays_within_block_kit_limits() -> None:
    from channels.slack import cards
    from tests.slack_fake import blocks_fit

    args = {"body": "<" * 4000} | {f"a{i:02d}": i for i in range(60)}
    card = cards.request_card({"id": "ap2", "tool": "t", "args": args, "reason": "r" * 5000, "approvers": []})
    assert blocks_fit(card) and card[-1]["type"] == "actions"
    texts = [b["text"]["text"] for b in card if b["type"] == "section"]
    body = next(t for t in texts if t.startswith("*body*"))
    assert body.endswith(f"_Value cut: {2600 // 4 * 4:,} of 16,000 characters shown._")
    shown = sum(1 for t in texts if t.startswith("*a"))
    warning = next(t for t in texts if t.startswith(":warning:"))
    assert warning == (
        f":warning: {60 - shown} more arguments not shown; a value cut: *body*. The full call: "
        "`handrail approvals list`, or GET /api/v1/approvals/ap2."
    )
    assert next(t for t in texts if t.startswith("*Why")).endswith("…\n_The reason was cut._")


def test_the_edit_modal_lists_every_argument() -> None:
    from channels.slack import cards

    args = {"long": "x" * 3001} | {f"a{i:02d}": i for i in range(12)}
    view = cards.edit_modal("ap3", "t", args)
    inputs = [b["block_id"] for b in view["blocks"] if b["type"] == "input"]
    assert inputs == [f"arg:a{i:02d}" for i in range(12)]
    assert view["blocks"][1] == section("*long*: 3,001 characters, too long to edit here; it keeps its value.")
    assert cards.edited_args(args, {"arg:a00": {"value": {"value": "7"}}, "arg:nope": {"value": {"value": "1"}}}) == (
        args | {"a00": 7}
    )  # an argument the call does not have is not added


async def test_a_long_rejection_reason_is_shown_cut_with_a_note_and_the_card_still_updates(slack: Rig) -> None:
    from bot import control

    approval_id, _ = await approval_card(slack)
    reason = "no: " + "<&>" * 2000
    outcome = await control.decide(slack.deps, approval_id, by="slack:UALICE", approved=False, feedback=reason)
    assert outcome.result == "ok"
    [update] = await slack.calls("chat.update", lambda c: len(c) >= 1)
    verdict = update.params["blocks"][-1]["text"]["text"]
    assert verdict.startswith(":x: Rejected by <@UALICE>: no: &lt;&amp;&gt;&lt;&amp;&gt;")
    assert verdict.endswith("…\n_The reason was cut; the agent was given all of it._") and len(verdict) <= 3000
    assert slack.fake.made("chat.update")[0].status == 200 and await slack.deps.bus.dead_letters() == []
    assert slack.fake.messages[0]["blocks"] == update.params["blocks"]


async def test_handrail_slash_command_lists_my_pending_approvals(slack: Rig) -> None:
    approval_id, _ = await approval_card(slack)
    base = {"command": "/handrail", "team_id": "T1", "channel_id": "CGEN", "trigger_id": "t1",
            "response_url": "https://hooks.slack.test/x"}  # fmt: skip
    mine = await slack.form(base | {"user_id": "UALICE", "text": ""})
    assert mine.status_code == 200
    assert mine.text == (
        'Waiting for your decision:\n• *issue_refund* `{"amount_cents": 2500, "order_id": "A100"}` '
        f"(thread `{tid()}`, approval `{approval_id}`)"
    )  # the answer is shown to the caller only
    others = await slack.form(base | {"user_id": "UBOB", "text": "approvals"})
    assert others.text == "Nothing is waiting for you."
    listed = await slack.form(base | {"user_id": "UBOB", "text": "threads"})
    assert f"`{tid()}` slack-desk: waiting_approval" in listed.text


def test_slack_identities_carry_the_workspace_and_slack_star_means_its_members() -> None:
    from channels.slack.identity import Person

    alice, outsider = Person("T1", "UALICE", "T1"), Person("T2", "UALICE", "T1")
    guest = Person("T1", "UGUEST", "T1", guest=True)
    assert alice.names() == ("slack:T1:UALICE", "slack:UALICE") and outsider.names() == ("slack:T2:UALICE",)
    assert alice.name_in(["slack:UALICE"]) == "slack:UALICE"  # the short form names the installed workspace's
    assert alice.name_in(["slack:T1:UALICE"]) == "slack:T1:UALICE"
    assert outsider.name_in(["slack:UALICE"]) is None and outsider.name_in(["slack:*"]) is None
    assert outsider.name_in(["slack:T2:UALICE"]) == "slack:T2:UALICE"  # named in full: let in
    assert guest.name_in(["slack:*"]) is None and guest.name_in(["slack:*"], allow_guests=True) == "slack:T1:UGUEST"
    assert guest.name_in(["slack:UGUEST"]) == "slack:UGUEST"
    assert alice.name_in(["slack:*"]) == "slack:T1:UALICE"  # the core's check matches it to slack:*


async def test_people_from_another_workspace_and_guests_cannot_decide_and_see_only_their_threads(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    # the same user id from another workspace (a Slack Connect channel): refused, nothing decided
    payload = {"type": "block_actions", "user": {"id": "UALICE", "team_id": "T2"}, "team": {"id": "T2"},
               "trigger_id": "trig", "channel": {"id": "CGEN"}, "message": {"ts": "1700000500.000001"},
               "actions": [{"action_id": "handrail_approve", "value": approval_id}]}  # fmt: skip
    assert (await slack.form({"payload": json.dumps(payload)})).status_code == 200
    [told] = await slack.calls("chat.postEphemeral", lambda c: len(c) >= 1)
    assert told.params["text"].startswith("You can't approve this: you belong to another workspace")
    # slack:* stands for the installed workspace's members only: a guest is refused (users.info asked once)
    redis, keys = slack.deps.redis, slack.deps.keys
    await redis.hset(keys.approval(approval_id), "approvers", "slack:*")
    slack.fake.users["UGUEST"] = {"is_restricted": True}
    for _ in range(2):
        await slack.click("handrail_approve", approval_id, "UGUEST", card)
    told = await slack.calls("chat.postEphemeral", lambda c: len(c) >= 3)
    assert told[-1].params["text"].startswith("You can't approve this: you are a guest in this workspace")
    assert [c.params["user"] for c in slack.fake.made("users.info")] == ["UGUEST"]
    assert (await approvals.get(redis, keys, approval_id)).state == "pending"
    base = {"command": "/handrail", "team_id": "T1", "channel_id": "CGEN", "trigger_id": "t1", "text": "threads"}
    assert (await slack.form(base | {"user_id": "UCAROL"})).text == "No Slack threads you may see."
    assert f"`{tid()}`" in (await slack.form(base | {"user_id": "UALICE"})).text  # an approver sees them all
    assert (await slack.form(base | {"user_id": "UBOB", "team_id": "T2"})).text == "No Slack threads you may see."
    # a member decides through slack:*, under their full name
    await slack.click("handrail_approve", approval_id, "UCAROL", card)
    await wait_for(slack.deps, tid(), status_is(Status.DONE))
    record = await approvals.get(redis, keys, approval_id)
    assert (record.state, record.by) == ("approved", "slack:T1:UCAROL")


async def test_cancelling_a_thread_takes_the_buttons_off_its_pending_card(slack: Rig) -> None:
    from bot import control

    approval_id, _ = await approval_card(slack)
    await control.cancel(slack.deps, tid(), by="api:ops")
    [update] = await slack.calls("chat.update", lambda c: len(c) >= 1)
    assert update.params["text"] == ":no_entry_sign: Cancelled by api:ops; nothing ran."
    assert update.params["blocks"][-1] == section(update.params["text"]) | {"block_id": "verdict"}
    assert not any(b["type"] == "actions" for b in update.params["blocks"])
    told = await slack.posted(2)
    assert told[1].params["text"] == "Cancelled by api:ops."
    assert (await approvals.get(slack.deps.redis, slack.deps.keys, approval_id)).state == "cancelled"


async def test_a_message_while_the_card_waits_is_recorded_and_its_sender_told_what_happens(slack: Rig) -> None:
    approval_id, card = await approval_card(slack)
    reply = {"type": "message", "channel_type": "channel", "channel": "CGEN", "user": "UBOB", "text": "any news?",
             "ts": "1700000009.000100", "thread_ts": "1700000000.000100", "team": "T1"}  # fmt: skip
    assert (await slack.event(reply)).status_code == 200
    [noted] = await slack.calls("chat.postEphemeral", lambda c: len(c) >= 1)
    assert noted.params == {
        "channel": "CGEN", "user": "UBOB", "thread_ts": "1700000000.000100",
        "text": "Noted. This thread waits for a decision on *issue_refund* (the card above); the agent reads your "
                "message once it is approved or rejected.",
    }  # fmt: skip

    async def recorded() -> bool:
        thread = await threads.get(slack.deps.redis, slack.deps.keys, tid())
        return any(getattr(e, "text", "") == "any news?" for e in thread.events)

    for _ in range(250):
        if await recorded():
            break
        await asyncio.sleep(0.02)
    thread = await threads.get(slack.deps.redis, slack.deps.keys, tid())
    assert thread.status is Status.WAITING_APPROVAL and count(thread, "message.received") == 2
    await slack.click("handrail_approve", approval_id, "UALICE", card)
    await wait_for(slack.deps, tid(), status_is(Status.DONE))


def test_the_readme_says_how_long_slack_delivery_is_retried() -> None:
    from bot.outbox import backoff
    from channels.slack.delivery import BASE_DELAY, MAX_ATTEMPTS
    from tests.conftest import ROOT

    waited = sum(backoff(n, BASE_DELAY, None) for n in range(1, MAX_ATTEMPTS))
    assert 240 <= waited <= 360, waited
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{MAX_ATTEMPTS} attempts over about five minutes" in readme


# -- delivery ---------------------------------------------------------------------------------------------------


async def test_rate_limits_and_server_errors_are_retried_until_delivered(slack: Rig, caplog: Any) -> None:
    caplog.set_level("DEBUG")
    slack.fake.failures["chat.postMessage"] = [(429, {"Retry-After": "1"}), (503, {})]
    await slack.event(mention("hello"))
    [reply] = await slack.posted(1)
    attempts = slack.fake.made("chat.postMessage", ok_only=False)
    assert [c.status for c in attempts] == [429, 503, 200]
    assert attempts[1].at - attempts[0].at >= 1.0  # Retry-After was honoured
    assert reply.params["thread_ts"] == "1700000000.000100"
    receipts = await receipts_of(slack.deps, tid())
    assert list(receipts.values()) == [b"1700000500.000001"]
    assert await slack.deps.redis.xlen(slack.deps.keys.dlq) == 0
    assert "HTTP 429 ratelimited" in caplog.text and "HTTP 503" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text


async def test_a_web_api_call_that_times_out_is_retried_until_delivered(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any
) -> None:
    monkeypatch.setenv("SLACK_API_TIMEOUT", "1")
    async with rig(deps, monkeypatch, start_worker) as slack:
        slack.fake.failures["chat.postMessage"] = [(0, {"hang": "3"})]
        await slack.event(mention("hello"))
        [reply] = await slack.posted(1)
        attempts = slack.fake.made("chat.postMessage", ok_only=False)
        assert [c.status for c in attempts] == [0, 200]
        assert attempts[1].at - attempts[0].at >= 1.0  # the first call was given up after the timeout
        assert reply.params["thread_ts"] == "1700000000.000100"
        assert await slack.deps.redis.xlen(slack.deps.keys.dlq) == 0


async def test_a_message_posted_whose_answer_timed_out_is_not_posted_again(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any
) -> None:
    """Slack posted it but answered after the client gave up (a fractional timeout, honoured as given): the retry
    finds the message by its metadata instead of posting a second copy, and keeps its ts as the receipt."""
    monkeypatch.setenv("SLACK_API_TIMEOUT", "0.4")
    async with rig(deps, monkeypatch, start_worker) as slack:
        slack.fake.epoch = int(time.time())  # the look-up asks for messages since the first attempt
        slack.fake.failures["chat.postMessage"] = [(-1, {"hang": "1.5"})]
        t0 = time.monotonic()
        await slack.event(mention("hello"))

        receipts = await receipts_of(deps, tid())
        assert time.monotonic() - t0 < 1.4, "the call was given up after 0.4 s, not a whole second or more"
        [message] = slack.fake.messages
        assert list(receipts.values()) == [message["ts"].encode()]
        assert len(slack.fake.made("chat.postMessage", ok_only=False)) == 1, "the retry did not post"
        [outbox_id] = [k.decode().removeprefix("slack:") for k in receipts]
        assert message["metadata"] == {"event_type": "handrail_outbox", "event_payload": {"outbox_id": outbox_id}}
        [lookup] = slack.fake.made("conversations.replies")
        assert (lookup.params["channel"], lookup.params["ts"]) == ("CGEN", "1700000000.000100")
        await asyncio.sleep(0.3)
        assert len(slack.fake.messages) == 1 and await deps.redis.xlen(deps.keys.dlq) == 0


async def test_a_top_level_message_whose_answer_was_lost_is_found_in_the_channel_history(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any
) -> None:
    monkeypatch.setenv("SLACK_API_TIMEOUT", "0.3")
    async with rig(deps, monkeypatch, start_worker) as slack:
        slack.fake.epoch = int(time.time())
        slack.fake.failures["chat.postMessage"] = [(-1, {"hang": "1"})]
        top = Outbound(id="e1", thread_id="api-1", ref=ChannelRef(kind="slack", address="CNEWS"), kind="text",
                       text="the nightly report is ready")  # fmt: skip
        await queue(deps, top)
        receipts = await receipts_of(deps, "api-1")
        [message] = slack.fake.messages
        assert receipts == {b"slack:e1": message["ts"].encode()} and message["thread_ts"] is None
        [lookup] = slack.fake.made("conversations.history")
        assert lookup.params["channel"] == "CNEWS" and slack.fake.made("conversations.replies") == []


def said(n: int, channel: str, thread_ts: str) -> Outbound:
    ref = ChannelRef(kind="slack", address=channel, user="slack:UBOB", thread_ts=thread_ts)
    return Outbound(id=f"e{n}", thread_id=f"slack-T1-{channel}-{thread_ts}", ref=ref, kind="text", text=f"say {n}")


async def queue(deps: Deps, *msgs: Outbound) -> None:
    pipe = deps.redis.pipeline(transaction=True)
    for m in msgs:
        pipe.execute_command(*outbox_command(deps.keys, m))
    await pipe.execute()


async def test_a_message_slack_will_never_take_is_dead_lettered_at_once_and_others_go_out(slack: Rig) -> None:
    slack.fake.failures["chat.postMessage"] = [(200, {"error": "channel_not_found"})]
    t0 = time.monotonic()
    await queue(slack.deps, said(1, "CGONE", "1.1"), said(2, "CGEN", "2.1"), said(3, "CGEN", "3.1"))
    calls = await slack.posted(3)  # Slack answers HTTP 200 to the refused call too
    assert time.monotonic() - t0 < 1.0, "nothing waited on the bad message"
    assert [c.params["text"] for c in calls] == ["say 1", "say 2", "say 3"], "the bad one was tried once"
    [(_, letter)] = await slack.deps.bus.dead_letters()
    assert letter["error"] == "PermanentDeliveryError: slack chat.postMessage: HTTP 200 channel_not_found"
    assert (json.loads(letter["payload"])["id"], letter["thread_id"]) == ("e1", "slack-T1-CGONE-1.1")
    redis, keys = slack.deps.redis, slack.deps.keys
    assert await redis.hgetall(keys.receipts("slack-T1-CGONE-1.1")) == {}
    assert await redis.hgetall(keys.receipts("slack-T1-CGEN-3.1")) == {b"slack:e3": b"1700000500.000002"}


async def test_a_rate_limited_message_holds_back_its_own_thread_only(slack: Rig) -> None:
    """A's first message gets a 429: B's message goes out meanwhile; A's second goes after A's first."""
    slack.fake.failures["chat.postMessage"] = [(429, {"Retry-After": "1"})]
    await queue(slack.deps, said(1, "CGEN", "1.1"), said(2, "CGEN", "1.1"), said(3, "COTHER", "9.1"))
    sent = await slack.posted(3)
    assert [c.params["text"] for c in sent] == ["say 3", "say 1", "say 2"]
    assert sent[1].at - sent[0].at >= 0.9, "A waited out its Retry-After"
    assert await slack.deps.bus.dead_letters() == []


@pytest.mark.parametrize(
    ("status", "error", "for_good"),
    [(200, "channel_not_found", True), (200, "not_in_channel", True), (200, "msg_too_long", True),
     (200, "invalid_blocks", True), (200, "is_archived", True), (200, "message_not_found", True),
     (429, "ratelimited", False), (503, "internal_error", False), (200, "fatal_error", False),
     (200, "invalid_auth", False), (200, "token_revoked", False), (200, "missing_scope", False), (502, "", False)],
)  # fmt: skip
def test_which_web_api_errors_are_final(status: int, error: str, for_good: bool) -> None:
    """Errors about the message or its channel are final; rate limits, outages and the app's own setup are not."""
    from channels.slack.delivery import refused_for_good

    assert refused_for_good(status, error) is for_good


async def test_a_second_deliverer_waits_its_turn_so_a_thread_is_told_things_in_order(slack: Rig) -> None:
    """Two processes deliver: while the first waits out a Retry-After, the second does not overtake it."""
    stop = asyncio.Event()
    second = asyncio.create_task(deliver_slack(slack.deps, stop, base_delay=0.05))
    try:
        await asyncio.sleep(0.2)
        slack.fake.failures["chat.postMessage"] = [(429, {"Retry-After": "2"})]
        await slack.event(mention("hello"))
        await slack.calls("chat.postMessage", lambda _: bool(slack.fake.made("chat.postMessage", ok_only=False)))
        follow_up = mention("refund Z999", ts="1700000000.000200") | {"thread_ts": "1700000000.000100"}
        await slack.event(follow_up)
        sent = await slack.posted(2)
        assert [c.params["text"].split(" ")[0] for c in sent] == ["I", "lookup_order"]  # asked first, told first
    finally:
        stop.set()
        await second


# -- bad input --------------------------------------------------------------------------------------------------


async def test_forged_stale_or_missing_signatures_get_401_and_record_nothing(slack: Rig) -> None:
    body = json.dumps({"type": "event_callback", "team_id": "T1", "event_id": "EvX", "event": mention("refund A100")})
    raw = body.encode()
    json_type = {"Content-Type": "application/json"}
    cases = {
        "forged": signed(raw, secret="not-the-secret"),
        "stale": signed(raw, stamp=int(time.time()) - 301),
        "missing": {},
    }
    for name, headers in cases.items():
        r = await slack.http.post("/slack/events", content=raw, headers=headers | json_type)
        assert r.status_code == 401, name
    r = await slack.http.post("/slack/events", content=raw + b" ", headers=signed(raw) | json_type)
    assert r.status_code == 401 and r.json()["detail"] == "signature does not match"
    assert await threads.recent_ids(slack.deps.redis, slack.deps.keys) == []
    for p in range(slack.deps.keys.partitions):
        assert await slack.deps.redis.xlen(slack.deps.keys.inbound(p)) == 0


async def test_malformed_payloads_get_400_and_unknown_events_are_ignored(slack: Rig, caplog: Any) -> None:
    for body, content_type, reason in [
        (b"[1, 2]", "application/json", "a JSON body must be an object with a 'type'"),
        (b"{not json", "application/json", "body is not valid"),
        (b'{"type": "event_callback"}', "application/json", "an event_callback needs an 'event' object"),
        (b"payload=%7Bnope", "application/x-www-form-urlencoded", "body is not valid"),
        (b"hello=1", "application/x-www-form-urlencoded", "a form body needs 'payload'"),
        (b"hello", "text/plain", "unsupported Content-Type 'text/plain'"),
    ]:
        r = await slack.http.post("/slack/events", content=body, headers=signed(body) | {"Content-Type": content_type})
        assert r.status_code == 400 and r.json()["detail"].startswith(reason), (body, r.text)
    caplog.set_level("INFO", logger="channels.slack")
    r = await slack.event({"type": "reaction_added", "user": "UBOB", "reaction": "tada", "event_ts": "1.0"})
    assert r.status_code == 200
    assert "ignored an event of type 'reaction_added'" in caplog.text
    challenge = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "legacy"}).encode()
    r = await slack.http.post(
        "/slack/events", content=challenge, headers=signed(challenge) | {"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and "c-123" in r.text
    assert await threads.recent_ids(slack.deps.redis, slack.deps.keys) == []


def _action(**over: Any) -> dict[str, Any]:
    return {"type": "block_actions", "user": {"id": "UALICE", "team_id": "T1"}, "team": {"id": "T1"},
            "trigger_id": "trig", "channel": {"id": "CGEN"}, "message": {"ts": "1.1"},
            "actions": [{"action_id": "handrail_approve", "value": "ap1"}]} | over  # fmt: skip


def _view(**over: Any) -> dict[str, Any]:
    return {"type": "view_submission", "user": {"id": "UALICE", "team_id": "T1"}, "team": {"id": "T1"},
            "view": {"type": "modal", "callback_id": "handrail_reject_view", "private_metadata": "ap1",
                     "state": {"values": {"reason": {"reason_input": {"value": "no"}}}}} | over}  # fmt: skip


def _command(**over: str) -> dict[str, str]:
    return {"command": "/handrail", "user_id": "UALICE", "team_id": "T1", "text": "", "trigger_id": "t"} | over


async def nothing_recorded(deps: Deps) -> None:
    assert await threads.recent_ids(deps.redis, deps.keys) == []
    for p in range(deps.keys.partitions):
        assert await deps.redis.xlen(deps.keys.inbound(p)) == 0


async def test_signed_payloads_missing_fields_or_of_the_wrong_types_get_400_with_a_reason(slack: Rig) -> None:
    message = mention("refund A100")
    events = [
        ({k: v for k, v in message.items() if k != "channel"}, "'event.channel' is missing"),
        ({k: v for k, v in message.items() if k != "ts"}, "'event.ts' is missing"),
        (message | {"ts": 1700000000.0001}, "'event.ts' must be a string"),
        (message | {"user": 42}, "'event.user' must be a string"),
        ({k: v for k, v in message.items() if k != "user"}, "'event.user' is missing"),
        (message | {"text": "\ud800"}, "body is not valid"),
    ]
    for event, reason in events:
        r = await slack.event(event)
        assert r.status_code == 400 and r.json()["detail"].startswith(reason), (event, r.text)
    forms: list[tuple[dict[str, str], str]] = [
        ({"payload": json.dumps(_action(actions=[]))}, "'actions' must be a list of at least one action object"),
        ({"payload": json.dumps(_action(actions=None))}, "'actions' must be a list"),
        ({"payload": json.dumps(_action(actions=[{"action_id": "handrail_approve"}]))}, "'actions[0].value' must"),
        ({"payload": json.dumps(_action(actions=[{"action_id": "x", "value": "a"}]))}, "action 'x' is not one of"),
        ({"payload": json.dumps(_action(user=None))}, "'user.id' is missing"),
        ({"payload": json.dumps(_action(user={"id": 7}))}, "'user.id' must be a string"),
        ({"payload": json.dumps(_action(channel=None))}, "'channel.id' is missing"),
        ({"payload": json.dumps(_view(private_metadata=None))}, "'view.private_metadata' must be the approval id"),
        ({"payload": json.dumps(_view(private_metadata=5))}, "'view.private_metadata' must be the approval id"),
        ({"payload": json.dumps(_view(state={"values": []}))}, "'view.state.values' must be an object of objects"),
        ({"payload": json.dumps(_view(callback_id="other"))}, "view 'other' is not one of Handrail's"),
        ({"payload": json.dumps({"type": "shortcut", "user": {"id": "U1"}})}, "interactivity of type 'shortcut'"),
        (_command(command="/other"), "slash command '/other' is not handled"),
        (_command(user_id=""), "'user_id' is missing"),
    ]
    for fields, reason in forms:
        r = await slack.form(fields)
        assert r.status_code == 400 and r.json()["detail"].startswith(reason), (fields, r.text)
    await nothing_recorded(slack.deps)
    assert [c.method for c in slack.fake.calls] == []  # nobody was told anything, not even privately


def _mutants(rng: random.Random, doc: Any, depth: int = 0) -> Any:
    """``doc`` with one random field removed or given a value of another type."""
    odd = [None, 0, -1, 1.5, True, "", "\ud800", "x" * 3000, [], {}, [{}], {"id": None}, "<!channel>"]
    if isinstance(doc, dict) and doc:
        key = rng.choice(list(doc))
        out = dict(doc)
        roll = rng.random()
        if roll < 0.3:
            del out[key]
        elif roll < 0.6 or depth > 4:
            out[key] = rng.choice(odd)
        else:
            out[key] = _mutants(rng, doc[key], depth + 1)
        return out
    if isinstance(doc, list) and doc:
        return [_mutants(rng, doc[0], depth + 1), *doc[1:]] if rng.random() < 0.7 else rng.choice(odd)
    return rng.choice(odd)


async def test_fuzzed_signed_payloads_never_get_a_5xx(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded fuzz over signed events, button clicks, modal submissions and commands (no worker, so whatever is
    accepted stays on the inbound stream): zero 5xx, and a 400 records nothing."""
    fake = FakeSlack()
    await fake.start()
    for name, value in {"SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": fake.url}.items():
        monkeypatch.setenv(name, value)
    rng = random.Random(10)
    dm = mention("hi") | {"type": "message", "channel_type": "im", "thread_ts": "1.1"}
    templates: list[tuple[str, Any]] = [
        ("event", {"type": "event_callback", "team_id": "T1", "event_id": "Ev", "event": mention("refund A100")}),
        ("event", {"type": "event_callback", "team_id": "T1", "event_id": "Ev", "event": dm}),
        ("payload", _action()), ("payload", _action(actions=[{"action_id": "handrail_edit", "value": "ap1"}])),
        ("payload", _view()), ("payload", _view(callback_id="handrail_edit_view")), ("command", _command()),
    ]  # fmt: skip
    statuses: dict[int, int] = {}

    async def recorded() -> int:
        pipe = deps.redis.pipeline(transaction=False)
        for p in range(deps.keys.partitions):
            pipe.xlen(deps.keys.inbound(p))
        return sum(await pipe.execute())

    try:
        async with web_client(deps) as http:
            for _ in range(60):  # about 40 ms each here: a few seconds
                kind, template = rng.choice(templates)
                doc = _mutants(rng, template)
                if kind == "event":
                    body, ctype = json.dumps(doc).encode(), "application/json"
                elif kind == "payload":
                    body, ctype = urlencode({"payload": json.dumps(doc)}).encode(), "application/x-www-form-urlencoded"
                else:
                    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}
                    body = urlencode(fields, errors="surrogatepass").encode()
                    ctype = "application/x-www-form-urlencoded"
                before = await recorded()
                r = await http.post("/slack/events", content=body, headers=signed(body) | {"Content-Type": ctype})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (doc, r.text)
                if r.status_code == 400:
                    assert await recorded() == before and r.json()["detail"], doc
    finally:
        await fake.stop()
    assert statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0, statuses


def test_the_manifest_subscribes_to_what_the_app_handles() -> None:
    """The shipped manifest and the app agree: one request URL, the events we listen to, /handrail."""
    import yaml

    from tests.conftest import ROOT

    manifest = yaml.safe_load((ROOT / "config" / "slack-manifest.yaml").read_text())
    settings = manifest["settings"]
    urls = {settings["event_subscriptions"]["request_url"], settings["interactivity"]["request_url"]}
    urls |= {c["url"] for c in manifest["features"]["slash_commands"]}
    assert urls == {"https://YOUR-HOST/slack/events"}
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == ["/handrail"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "app_mention", "message.im", "message.channels", "message.groups"
    }  # fmt: skip
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"app_mentions:read", "chat:write", "im:history", "channels:history", "commands", "users:read"} <= scopes


async def test_socket_mode_events_are_recorded_then_acknowledged(deps: Deps, start_worker: Any) -> None:
    from channels.slack.settings import SlackSettings
    from channels.slack.socket_mode import run_socket_mode

    fake = FakeSlack()
    body = {"type": "event_callback", "team_id": "T1", "api_app_id": "A1", "event_id": "EvSock1",
            "event_time": int(time.time()), "event": mention("hello over a socket")}  # fmt: skip
    fake.envelopes.append({"envelope_id": "env-1", "type": "events_api", "accepts_response_payload": False,
                           "retry_attempt": 0, "retry_reason": "", "payload": body})  # fmt: skip

    async def recorded() -> bool:
        return bool(await deps.redis.exists(deps.keys.seen("slack:T1:CGEN:1700000000.000100")))

    fake.on_ack = recorded
    await fake.start()
    await start_worker()
    settings = SlackSettings(TOKEN, SECRET, "xapp-test-only", fake.url)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_socket_mode(deps, stop, settings=settings)),
             asyncio.create_task(deliver_slack(deps, stop, settings=settings, base_delay=0.05))]  # fmt: skip
    try:
        await asyncio.wait_for(fake.acked.wait(), 10)
        assert fake.acks[:1] == [{"envelope_id": "env-1"}]
        assert fake.seen_at_ack[:1] == [True]  # on the inbound stream before Slack was told
        opened = fake.made("apps.connections.open")
        assert len(opened) == 1
        async with httpx.AsyncClient() as unused:
            [reply] = await Rig(unused, fake, deps).posted(1)
        assert (reply.params["channel"], reply.params["thread_ts"]) == ("CGEN", "1700000000.000100")
        thread = await threads.get(deps.redis, deps.keys, tid())
        said = next(e for e in thread.events if e.type == "message.received")
        assert said.text == "hello over a socket"  # type: ignore[union-attr]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await fake.stop()


def test_slack_settings_are_all_or_nothing_and_keep_secrets_out_of_sight() -> None:
    from bot.errors import ConfigError
    from channels.slack.settings import SlackSettings

    assert SlackSettings.from_env({}) is None
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET: not set, but SLACK_BOT_TOKEN is"):
        SlackSettings.from_env({"SLACK_BOT_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN: not set"):
        SlackSettings.from_env({"SLACK_SIGNING_SECRET": SECRET})
    full = SlackSettings.from_env({"SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET,
                                   "SLACK_APP_TOKEN": "xapp-1", "SLACK_API_URL": "http://127.0.0.1:1/api"})  # fmt: skip
    assert full is not None and (full.app_token, full.api_url) == ("xapp-1", "http://127.0.0.1:1/api/")
    assert TOKEN not in repr(full) and SECRET not in repr(full) and "xapp-1" not in repr(full)
    default = SlackSettings.from_env({"SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET})
    assert default is not None and (default.app_token, default.api_url) == (None, "https://slack.com/api/")
    from channels.slack.app import web_client as slack_client

    base = {"SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET}
    fractional = SlackSettings.from_env(base | {"SLACK_API_TIMEOUT": "2.5"})
    assert fractional is not None and slack_client(fractional).timeout == 2.5  # not truncated to 2
    for bad in ("soon", "0", "-1", "nan"):
        with pytest.raises(ConfigError, match="SLACK_API_TIMEOUT: expected seconds"):
            SlackSettings.from_env(base | {"SLACK_API_TIMEOUT": bad})
