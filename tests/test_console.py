"""The browser console over real HTTP (uvicorn on a port-0 socket), real Redis and an in-process worker: access,
CSRF, decisions through the core's approver check, and agent output, messages and arguments shown as text."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bot import approvals, control, threads
from bot.events import ChannelRef
from bot.runtime import Deps
from bot.settings import Settings
from bot.threads import Status
from tests.conftest import ROOT, status_is, wait_for, web_client
from tests.scripted_model import ScriptedModel, call, text
from tests.slow_agent import FAIL

API = ChannelRef(kind="api", address="ops", user="api:ops")
CONFIG = ROOT / "tests" / "config" / "console.yaml"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings, with the console tests' agents."""
    return dataclasses.replace(settings, config_path=CONFIG)


@pytest.fixture
async def console(deps: Deps, start_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The console on 127.0.0.1 (no login: the local admin), with a worker running."""
    await start_worker()
    async with web_client(deps) as client:
        yield client


def csrf(html: str) -> str:
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', html)  # the page's token, as htmx sends it
    assert found, html
    return found.group(1)


async def token(client: httpx.AsyncClient, path: str = "/console/chat") -> str:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    return csrf(r.text)


async def say(client: httpx.AsyncClient, message: str, agent: str = "console-desk", thread: str = "") -> str:
    """Send a chat message from the console; returns the thread it went to."""
    fields = {"csrf": await token(client), "agent": agent, "text": message} | ({"thread": thread} if thread else {})
    r = await client.post("/console/chat", data=fields)
    assert r.status_code == 303, r.text
    found = re.search(r"thread=([0-9a-z]+)", r.headers["location"])
    assert found
    return found.group(1)


async def decide(client: httpx.AsyncClient, approval_id: str, htmx: bool = True, **fields: str) -> httpx.Response:
    headers = {"HX-Request": "true"} if htmx else {}
    form = {"csrf": await token(client, "/console/approvals"), **fields}
    return await client.post(f"/console/approvals/{approval_id}/decide", data=form, headers=headers)


async def test_pages_open_without_login_on_localhost_with_strict_security_headers(
    console: httpx.AsyncClient,
) -> None:
    r = await console.get("/")
    assert (r.status_code, r.headers["location"]) == (303, "/console/chat")
    r = await console.get("/console/chat")
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("handrail_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    for path in ("/console/chat", "/console/approvals", "/console/threads", "/console/dead-letters"):
        r = await console.get(path)
        assert r.status_code == 200, (path, r.text)
        assert "console:admin" in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        # nothing inline for the CSP to refuse: no script body, no on* handler, no style attribute
        assert not re.search(r"<script>|<[^>]*\s(on[a-z]+|style)\s*=", r.text), path
    assert (await console.get("/console/static/console.js")).status_code == 200
    assert (await console.get("/console/static/../access.py")).status_code == 404
    # DNS rebinding: a page elsewhere reaching 127.0.0.1 through its own name gets nothing
    console.cookies.clear()
    rebound = await console.get("/console/chat", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 400


async def test_a_post_without_the_form_token_or_from_another_origin_changes_nothing(
    console: httpx.AsyncClient, deps: Deps
) -> None:
    good = await token(console)
    no_token = await console.post("/console/chat", data={"agent": "console-desk", "text": "refund A100"})
    assert no_token.status_code == 403 and "form token" in no_token.text
    wrong = await console.post("/console/chat", data={"csrf": "x" + good, "agent": "console-desk", "text": "hi"})
    assert wrong.status_code == 403
    foreign = await console.post("/console/chat", data={"csrf": good, "agent": "console-desk", "text": "hi"},
                                 headers={"Origin": "https://evil.example"})  # fmt: skip
    assert foreign.status_code == 403
    assert await threads.recent_ids(deps.redis, deps.keys) == []
    assert (await console.post("/console/chat", data={"csrf": good, "agent": "console-desk", "text": "hi"})
            ).status_code == 303  # fmt: skip


async def test_chat_launches_a_thread_and_a_decision_in_the_console_runs_the_tool_once(
    console: httpx.AsyncClient, deps: Deps
) -> None:
    tid = await say(console, "refund A100 25")
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    assert thread.origin == ChannelRef(kind="console", address="admin", user="console:admin")
    request = thread.open_approval()
    assert request is not None
    log = (await console.get(f"/console/chat/{tid}/log")).text
    assert "issue_refund" in log and 'name="action" value="approve"' in log

    inbox = (await console.get("/console/approvals")).text
    assert f'data-approval="{request.approval_id}"' in inbox
    assert f'expires <time datetime="{request.expires_at}"' in inbox and request.expires_at > request.at
    r = await decide(console, request.approval_id, action="approve")
    assert r.status_code == 200 and "approved by console:admin" in r.text
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert [e.type for e in thread.events].count("tool.result") == 2  # the lookup, and the refund: once
    assert await deps.redis.xlen(deps.keys.outbox("console")) == 0  # nobody reads a console outbox: none is kept

    again = await decide(console, request.approval_id, action="reject", reason="too late")
    assert "already approved by console:admin" in again.text
    timeline = (await console.get(f"/console/threads/{tid}")).text
    assert timeline.count('data-type="tool.started"') == 2 and "Refunded $25.00 on order A100" in timeline
    listed = (await console.get("/console/threads", params={"status": "done", "agent": "console-desk"})).text
    assert f"/console/threads/{tid}" in listed
    # a reply into the same thread continues it
    assert await say(console, "refund A101", thread=tid) == tid
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))


async def test_a_console_decision_counts_only_for_a_configured_approver(console: httpx.AsyncClient, deps: Deps) -> None:
    accepted = await control.launch(deps, "refund-desk", "refund A100", API)  # approvers: terminal:alice, api:ops
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    inbox = (await console.get("/console/approvals")).text
    assert "waiting for approval by terminal:alice, api:ops" in inbox and 'value="approve"' not in inbox
    r = await decide(console, request.approval_id, htmx=False, action="approve")
    assert r.status_code == 422 and "console:admin may not decide this approval" in r.text
    assert (await approvals.get(deps.redis, deps.keys, request.approval_id)).state == "pending"


async def test_edited_arguments_are_checked_and_errors_shown_in_place(console: httpx.AsyncClient, deps: Deps) -> None:
    tid = await say(console, "refund A100 25")
    request = (await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))).open_approval()
    assert request is not None
    aid = request.approval_id
    cases = [
        ({"action": "edit", "args": "{not json"}, "the arguments are not JSON"),
        ({"action": "edit", "args": "[1]"}, "must be a JSON object"),
        ({"action": "edit", "args": '{"order_id": "A100", "amount_cents": -5}'}, "edited arguments for issue_refund"),
        ({"action": "reject", "reason": ""}, "give a reason"),
        ({"action": "launch"}, "choose approve, reject"),
    ]
    for fields, error in cases:
        r = await decide(console, aid, **fields)
        assert r.status_code == 200 and error in r.text, (fields, r.text)
        assert 'role="alert"' in r.text
        if "args" in fields:  # what was typed stays, to be corrected
            assert fields["args"].replace('"', "&#34;") in r.text
    assert (await approvals.get(deps.redis, deps.keys, aid)).state == "pending"
    r = await decide(console, aid, action="edit", args='{"order_id": "A100", "amount_cents": 1000}')
    assert "approved by console:admin" in r.text
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert thread.events[-1].text == "Refunded $10.00 on order A100 (" + thread.events[-1].text.split("(")[1]  # type: ignore[union-attr]


async def test_a_thread_is_paused_resumed_and_cancelled_from_its_timeline(
    console: httpx.AsyncClient, deps: Deps
) -> None:
    tid = await say(console, "refund A100")
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    for verb, status in [("pause", Status.PAUSED), ("resume", Status.WAITING_APPROVAL), ("cancel", Status.CANCELLED)]:
        page = (await console.get(f"/console/threads/{tid}")).text
        assert f'action="/console/threads/{tid}/{verb}"' in page
        r = await console.post(f"/console/threads/{tid}/{verb}", data={"csrf": csrf(page)})
        assert r.status_code == 303, r.text
        thread = await wait_for(deps, tid, status_is(status))
    assert thread.events[-1].by == "console:admin"  # type: ignore[union-attr]
    assert "/cancel" not in (await console.get(f"/console/threads/{tid}")).text
    assert (await console.post("/console/threads/nope/pause", data={"csrf": csrf(page)})).status_code == 404
    assert (await console.post(f"/console/threads/{tid}/delete", data={"csrf": csrf(page)})).status_code == 404


async def test_a_rejection_with_a_reason_reaches_the_agent(console: httpx.AsyncClient, deps: Deps) -> None:
    tid = await say(console, "refund A102")
    request = (await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))).open_approval()
    assert request is not None
    r = await decide(console, request.approval_id, action="reject", reason="not this one")
    assert "rejected by console:admin" in r.text
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert "console:admin rejected the refund" in thread.events[-1].text  # type: ignore[union-attr]


SCRIPT = "<script>alert('x')</script>"
IMG = "<img src=x onerror=alert(1)>"


async def test_messages_replies_and_arguments_are_shown_as_text(
    console: httpx.AsyncClient, deps: Deps, model: ScriptedModel
) -> None:
    model.add(text(f"reply {IMG} {SCRIPT}"))
    said = await say(console, f"hello {SCRIPT} {IMG}", agent="support")
    await wait_for(deps, said, status_is(Status.DONE))
    model.add(call("issue_refund", {"order_id": IMG, "amount_cents": 100}))
    gated = await say(console, "refund please", agent="support")
    await wait_for(deps, gated, status_is(Status.WAITING_APPROVAL))
    pages = [f"/console/chat?thread={said}", f"/console/chat/{said}/log", f"/console/threads/{said}",
             f"/console/threads/{gated}", f"/console/chat?thread={gated}", "/console/approvals"]  # fmt: skip
    for path in pages:
        html = (await console.get(path)).text
        assert "<script>alert" not in html and "<img src" not in html, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in html or "\\u003cimg src=x" in html, path
    timeline = (await console.get(f"/console/threads/{said}")).text
    assert "prompt sent at this step (verified against the recorded hash)" in timeline
    assert "tool schemas sent at this step" in timeline and "&#34;issue_refund&#34;" in timeline
    chat = (await console.get(f"/console/chat?thread={said}")).text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in chat and "reply &lt;img" in chat


async def test_dead_letters_are_listed_retried_and_purged(console: httpx.AsyncClient, deps: Deps) -> None:
    FAIL["on"] = True
    try:
        first = await control.launch(deps, "flaky", "hello", API)
        second = await control.launch(deps, "flaky", "again", API)
        for _ in range(300):  # three attempts each with back-off, then the dead-letter stream
            if await deps.redis.xlen(deps.keys.dlq) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        FAIL["on"] = False
    letters = await deps.bus.dead_letters()
    assert len(letters) == 2
    page = (await console.get("/console/dead-letters")).text
    assert page.count("the flaky agent is failing on purpose") == 2
    form = {"csrf": csrf(page)}
    r = await console.post(f"/console/dead-letters/{letters[0][0]}/retry", data=form)
    assert r.status_code == 303
    page = (await console.get(r.headers["location"])).text
    assert f"retried {letters[0][0]} as" in page
    for _ in range(200):  # the retried one completes; the other stays dead-lettered
        done = [a.thread_id for a in (first, second)
                if (await threads.load(deps.redis, deps.keys, a.thread_id)).status is Status.DONE]  # fmt: skip
        if done:
            break
        await asyncio.sleep(0.05)
    assert len(done) == 1
    r = await console.post("/console/dead-letters/purge", data=form | {"ids": letters[1][0]})
    assert "purged 1 dead letter" in (await console.get(r.headers["location"])).text
    assert await deps.bus.dead_letters() == []
    r = await console.post("/console/dead-letters/purge", data=form | {"ids": letters[1][0]})
    assert "no dead letter" in (await console.get(r.headers["location"])).text


async def test_the_event_stream_says_changed_when_the_watched_thread_changes(
    console: httpx.AsyncClient, deps: Deps
) -> None:
    tid = await say(console, "hello")
    await wait_for(deps, tid, status_is(Status.DONE))
    bad = await console.get("/console/events", params={"watch": "everything"})
    assert bad.status_code == 400
    async with console.stream("GET", "/console/events", params={"watch": f"thread:{tid}", "since": "0-0"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        got = [await anext(lines) for _ in range(5)]
    assert got[:2] == ["retry: 1000", ""] and got[2] == "event: changed" and got[3].startswith("id: ")


# -- bound to a public address ----------------------------------------------------------------------------------


def public_console(deps: Deps) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    """The web app bound to every address (0.0.0.0), reached through loopback."""
    return web_client(deps, bind="0.0.0.0")


async def test_bound_to_a_public_address_the_console_needs_a_login_that_must_be_configured(deps: Deps) -> None:
    async with public_console(deps) as client:
        r = await client.get("/console/approvals")
        assert (r.status_code, r.headers["location"]) == (303, "/console/login?next=%2Fconsole%2Fapprovals")
        page = (await client.get(r.headers["location"])).text
        assert "HANDRAIL_CONSOLE_PASSWORD" in page and 'type="password"' not in page
        assert (await client.get("/console/events", params={"watch": "approvals"})).status_code == 401
        assert (await client.post("/console/chat", data={"text": "hi"})).status_code == 401


async def test_a_login_gives_a_session_and_users_decide_as_their_console_identity(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HANDRAIL_CONSOLE_PASSWORD", "admin-pw-123")
    monkeypatch.setenv("HANDRAIL_CONSOLE_USERS", "alice:alice-pw-456,bob:bob-pw-789")
    await start_worker()
    accepted = await control.launch(deps, "console-desk", "refund A100", API)
    request = (await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))).open_approval()
    assert request is not None
    async with public_console(deps) as client:
        wrong = await client.post("/console/login", data={"name": "alice", "password": "admin-pw-123"})
        assert wrong.status_code == 401 and "wrong name or password" in wrong.text
        assert "handrail_console" not in client.cookies

        async def login(name: str, password: str) -> None:
            client.cookies.clear()
            r = await client.post("/console/login", data={"name": name, "password": password,
                                                          "next": "/console/approvals"})  # fmt: skip
            assert (r.status_code, r.headers["location"]) == (303, "/console/approvals")
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age" in cookie

        await login("bob", "bob-pw-789")
        page = (await client.get("/console/approvals")).text
        assert "console:bob" in page and "waiting for approval by console:admin, console:alice" in page
        r = await decide(client, request.approval_id, action="approve")
        assert "console:bob may not decide this approval" in r.text

        tampered = client.cookies["handrail_console"][:-2] + "xx"
        client.cookies.clear()
        client.cookies.set("handrail_console", tampered)
        assert (await client.get("/console/approvals")).status_code == 303

        for _ in range(10):  # a name tried too often is locked, even for its right password
            await client.post("/console/login", data={"name": "bob", "password": "guess"})
        locked = await client.post("/console/login", data={"name": "bob", "password": "bob-pw-789"})
        assert locked.status_code == 429 and "too many failed logins" in locked.text

        await login("alice", "alice-pw-456")
        r = await decide(client, request.approval_id, action="approve")
        assert "approved by console:alice" in r.text
        await wait_for(deps, accepted.thread_id, status_is(Status.DONE))
        logout = await client.post("/console/logout", data={"csrf": await token(client, "/console/approvals")})
        assert logout.status_code == 303
        assert (await client.get("/console/approvals")).status_code == 303


async def test_the_thread_list_filters_by_the_channel_a_thread_started_on(
    console: httpx.AsyncClient, deps: Deps
) -> None:
    mine = await say(console, "hello")
    terminal = ChannelRef(kind="terminal", address="t", user="terminal:x")
    other = await control.launch(deps, "console-desk", "hello", terminal)
    for tid in (mine, other.thread_id):
        await wait_for(deps, tid, lambda t: t.status is not Status.RUNNING)
    page = (await console.get("/console/threads?channel=console")).text
    assert f"/console/threads/{mine}" in page and f"/console/threads/{other.thread_id}" not in page
    everything = (await console.get("/console/threads")).text
    assert f"/console/threads/{mine}" in everything and f"/console/threads/{other.thread_id}" in everything
    listed = await control.threads_page(deps, channel="terminal")
    assert [(s.id, s.channel) for s in listed.items] == [(other.thread_id, "terminal")]
