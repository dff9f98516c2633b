"""The REST API's edges over real HTTP: bad bytes, authentication first, per-key limits, control right after a
launch, and cursor pages over the whole index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bot import threads
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for, web_client
from tests.test_api import KEYS, auth

LAUNCH = {"agent": "refund-desk", "message": "hello"}
POSTS = [  # every POST route of the API, with a valid body
    ("/api/v1/threads", LAUNCH),
    ("/api/v1/threads/T1/messages", {"text": "hi"}),
    ("/api/v1/threads/T1/answer", {"text": "hi"}),
    ("/api/v1/approvals/A1/decision", {"approved": True}),
]


@pytest.fixture
async def web(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    """The web app without a worker: what is published stays on the stream, not applied."""
    for name, key in KEYS.items():
        monkeypatch.setenv(f"TEST_API_KEY_{name.upper()}", key)
    async with web_client(deps) as client:
        yield client


@pytest.fixture
async def api(web: httpx.AsyncClient, start_worker: Any) -> httpx.AsyncClient:
    await start_worker()
    return web


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": auth("ops") | {"Content-Type": "application/json"}}


@pytest.mark.parametrize(("path", "body"), POSTS)
async def test_a_lone_surrogate_is_refused_with_the_reason_on_every_post(
    web: httpx.AsyncClient, deps: Deps, path: str, body: dict[str, Any]
) -> None:
    text = httpx.Request("POST", "/", json=body).content.decode()
    poisoned = text.replace('"hi"', '"hi \\ud800"').replace('"hello"', '"\\ud800"').replace("true", '"\\udfff"')
    if poisoned == text:  # a body without strings: add a key with one
        poisoned = text[:-1] + ', "x": "\\ud800"}'
    r = await web.post(path, **raw_json(poisoned))
    assert r.status_code == 422, r.text
    assert "lone UTF-16 surrogate" in r.json()["detail"][0]["ctx"]["error"]
    key = await web.post(path, **raw_json('{"\\ud800": 1}'))
    assert key.status_code == 422 and "surrogate" in key.text
    assert await threads.recent_ids(deps.redis, deps.keys) == []
    assert await deps.redis.xlen(deps.keys.inbound_for("T1")) == 0


async def test_non_utf8_bodies_get_422_and_utf16_is_not_guessed(web: httpx.AsyncClient, deps: Deps) -> None:
    latin1 = b'{"agent": "refund-desk", "message": "caf\xe9"}'
    utf16 = '{"agent": "refund-desk", "message": "x"}'.encode("utf-16")
    for body in (latin1, utf16):
        r = await web.post("/api/v1/threads", content=body, headers=auth("ops") | {"Content-Type": "application/json"})
        assert r.status_code == 422 and "not UTF-8" in r.json()["detail"][0]["ctx"]["error"], r.text
    assert await threads.recent_ids(deps.redis, deps.keys) == []


async def test_a_chunked_body_over_the_limit_gets_413_on_an_api_route(web: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"agent": "refund-desk", "message": "'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}'

    r = await web.post(
        "/api/v1/threads", content=chunks(), headers=auth("ops") | {"Content-Type": "application/json"}
    )  # fmt: skip
    assert r.status_code == 413 and "over 262144 bytes" in r.json()["detail"]


@pytest.mark.parametrize("path", [p for p, _ in POSTS] + ["/api/v1/threads/T1/pause"])
async def test_authentication_comes_before_the_body(web: httpx.AsyncClient, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["ops"]}):  # the last: a bare key
        r = await web.post(path, content=b"{not json", headers=headers | {"Content-Type": "application/json"})
        assert r.status_code == 401, (headers, r.text)
        assert r.json() == {"detail": "missing or invalid API key"}


async def test_the_bearer_scheme_is_case_insensitive(web: httpx.AsyncClient) -> None:
    for scheme in ("bearer", "BEARER", "BeArEr"):
        r = await web.get("/api/v1/threads", headers={"Authorization": f"{scheme} {KEYS['reader']}"})
        assert r.status_code == 200, scheme
    assert (await web.get("/api/v1/threads", headers={"Authorization": f"Basic {KEYS['reader']}"})).status_code == 401


async def test_a_key_launches_only_on_its_channels_and_agents_and_speaks_as_itself(
    web: httpx.AsyncClient, deps: Deps
) -> None:
    h = auth("narrow")
    elsewhere = [{"kind": "email", "address": "victim@example.net"}, {"kind": "slack", "address": "C0GENERAL"}]
    for channel in elsewhere:
        r = await web.post("/api/v1/threads", json=LAUNCH | {"channel": channel}, headers=h)
        assert r.status_code == 403 and "may not start threads on" in r.json()["detail"]
    other_agent = await web.post("/api/v1/threads", json=LAUNCH | {"agent": "support"}, headers=h)
    assert other_agent.status_code == 403 and "may not use agent 'support'" in other_agent.json()["detail"]
    speaker = {"kind": "api", "address": "x", "user": "slack:U024BE7LH"}
    assert (await web.post("/api/v1/threads", json=LAUNCH | {"channel": speaker}, headers=h)).status_code == 422
    assert await threads.recent_ids(deps.redis, deps.keys) == []
    assert await deps.redis.xlen(deps.keys.inbound(0)) == 0

    ok = await web.post(
        "/api/v1/threads", json=LAUNCH | {"channel": {"kind": "email", "address": "ops@example.com"}}, headers=h
    )
    assert ok.status_code == 202, ok.text
    launched = await _pending(deps, ok.json()["thread_id"])
    assert launched.ref.model_dump() == {"kind": "email", "address": "ops@example.com", "user": "api:narrow"}
    # a default key stays on the API, named by the server
    mine = await web.post("/api/v1/threads", json=LAUNCH | {"channel": {"kind": "api", "address": "ops2"}},
                          headers=auth("intern"))  # fmt: skip
    assert (await _pending(deps, mine.json()["thread_id"])).ref.model_dump() == {
        "kind": "api", "address": "intern", "user": "api:intern"
    }  # fmt: skip
    assert (await web.post("/api/v1/threads", json=LAUNCH | {"channel": elsewhere[1]}, headers=auth("intern"))
            ).status_code == 403  # fmt: skip


async def _pending(deps: Deps, thread_id: str) -> Any:
    from bot import control

    launched = await control.pending_launch(deps, thread_id)
    assert launched is not None
    return launched


async def test_a_key_reads_only_threads_of_its_agents(api: httpx.AsyncClient, deps: Deps) -> None:
    r = await api.post("/api/v1/threads", json={"agent": "support", "message": "hi"}, headers=auth("ops"))
    tid = r.json()["thread_id"]
    mine = await api.post("/api/v1/threads", json=LAUNCH, headers=auth("narrow"))
    await wait_for(deps, mine.json()["thread_id"], status_is(Status.DONE))
    assert (await api.get(f"/api/v1/threads/{tid}", headers=auth("narrow"))).status_code == 404
    listed = (await api.get("/api/v1/threads", headers=auth("narrow"))).json()
    assert [t["id"] for t in listed["items"]] == [mine.json()["thread_id"]]


async def test_control_right_after_a_launch_is_accepted_and_404s_are_not_kept(
    web: httpx.AsyncClient, deps: Deps
) -> None:
    h = auth("ops")
    early = await web.post("/api/v1/threads/later/pause", headers=h | {"Idempotency-Key": "k1"})
    assert early.status_code == 404
    tid = (await web.post("/api/v1/threads", json=LAUNCH, headers=h)).json()["thread_id"]
    assert await threads.recent_ids(deps.redis, deps.keys) == []  # on the stream, not applied: no worker runs
    queued = await web.get(f"/api/v1/threads/{tid}", headers=h)  # just created: found, with an empty log
    assert queued.status_code == 200 and {k: queued.json()[k] for k in ("agent", "status", "events", "events_log")} == {
        "agent": "refund-desk", "status": "queued", "events": 0, "events_log": []
    }  # fmt: skip
    for verb in ("pause", "resume"):
        assert (await web.post(f"/api/v1/threads/{tid}/{verb}", headers=h)).status_code == 202, verb
    r = await web.post(f"/api/v1/threads/{tid}/messages", json={"text": "and refund A100"}, headers=h)
    assert r.status_code == 202, r.text
    answer = await web.post(f"/api/v1/threads/{tid}/answer", json={"text": "x"}, headers=h)
    assert answer.status_code == 409 and "not started yet" in answer.json()["detail"]
    # the same Idempotency-Key that got a 404 is free again: the request now succeeds
    named = (await web.post("/api/v1/threads", json=LAUNCH | {"business_key": "later"}, headers=h)).json()
    assert named["thread_id"] == "refund-desk.later"
    retried = await web.post("/api/v1/threads/refund-desk.later/pause", headers=h | {"Idempotency-Key": "k1"})
    first = await web.post("/api/v1/threads/nope/cancel", headers=h | {"Idempotency-Key": "k2"})
    again = await web.post("/api/v1/threads/nope/cancel", headers=h | {"Idempotency-Key": "k2"})
    assert retried.status_code == 202 and first.status_code == again.status_code == 404
    assert "Idempotent-Replayed" not in again.headers
    assert (await web.post(f"/api/v1/threads/{tid}/cancel", headers=h)).status_code == 202
    assert await threads.recent_ids(deps.redis, deps.keys) == []


async def test_control_right_after_a_launch_is_applied_in_order(api: httpx.AsyncClient, deps: Deps) -> None:
    h = auth("ops")
    tid = (await api.post("/api/v1/threads", json={**LAUNCH, "message": "refund A100 25"}, headers=h)).json()[
        "thread_id"
    ]
    assert (await api.post(f"/api/v1/threads/{tid}/cancel", headers=h)).status_code == 202
    await wait_for(deps, tid, status_is(Status.CANCELLED))


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


async def follow(api: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of a listing, following ``next``."""
    pages, cursor = [], None
    while True:
        r = await api.get(path, params=params | ({"cursor": cursor} if cursor else {}), headers=auth("reader"))
        assert r.status_code == 200, r.text
        pages.append(r.json())
        cursor = r.json()["next"]
        if cursor is None:
            return pages


async def test_approvals_and_threads_page_through_the_whole_index(api: httpx.AsyncClient, deps: Deps) -> None:
    h = auth("ops")
    waiting = []
    for n in range(3):  # the oldest threads wait for approval...
        tid = (await api.post("/api/v1/threads", json={**LAUNCH, "message": f"refund A10{n} 25"}, headers=h)).json()
        waiting.append(tid["thread_id"])
        await wait_for(deps, waiting[-1], status_is(Status.WAITING_APPROVAL))
    done = []
    for _ in range(9):  # ...behind many newer ones that are done
        done.append((await api.post("/api/v1/threads", json=LAUNCH, headers=h)).json()["thread_id"])
        await wait_for(deps, done[-1], status_is(Status.DONE))

    pages = await follow(api, "/api/v1/approvals", limit=2)
    assert [len(p["items"]) for p in pages] == [2, 1]
    assert [a["thread_id"] for p in pages for a in p["items"]] == waiting  # oldest first, each once

    pages = await follow(api, "/api/v1/threads", status="waiting_approval", limit=1)
    assert [t for p in pages for t in _ids(p)] == waiting[::-1]  # found past the 4·limit most recent
    assert all(len(p["items"]) <= 1 for p in pages)
    pages = await follow(api, "/api/v1/threads", limit=5)
    assert [t for p in pages for t in _ids(p)] == (waiting + done)[::-1]
    bad = await api.get("/api/v1/threads", params={"cursor": "garbage"}, headers=auth("reader"))
    assert bad.status_code == 422  # not of the cursor's form (the schema says which)


async def test_a_key_sees_only_approvals_of_its_agents(api: httpx.AsyncClient, deps: Deps) -> None:
    ours = await api.post("/api/v1/threads", json={"agent": "refund-desk", "message": "refund A100"},
                          headers=auth("ops"))  # fmt: skip
    theirs = await api.post("/api/v1/threads", json={"agent": "slack-desk", "message": "refund A101"},
                            headers=auth("ops"))  # fmt: skip
    for r in (ours, theirs):
        await wait_for(deps, r.json()["thread_id"], status_is(Status.WAITING_APPROVAL))
    everything = (await api.get("/api/v1/approvals", headers=auth("ops"))).json()["items"]
    assert sorted(a["thread_id"] for a in everything) == sorted(r.json()["thread_id"] for r in (ours, theirs))
    listed = (await api.get("/api/v1/approvals", headers=auth("narrow"))).json()
    assert [a["thread_id"] for a in listed["items"]] == [ours.json()["thread_id"]] and listed["next"] is None
    other = next(a["id"] for a in everything if a["thread_id"] == theirs.json()["thread_id"])
    assert (await api.get(f"/api/v1/approvals/{other}", headers=auth("narrow"))).status_code == 404
    mine = listed["items"][0]["id"]
    assert (await api.get(f"/api/v1/approvals/{mine}", headers=auth("narrow"))).json()["state"] == "pending"


async def test_a_method_a_path_does_not_take_is_405_naming_every_method_it_does(web: httpx.AsyncClient) -> None:
    r = await web.delete("/api/v1/threads", headers=auth("ops"))
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json() == {"detail": "Method Not Allowed"}
    r = await web.get("/api/v1/threads/T1/pause", headers=auth("ops"))
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_threads_filter_by_the_channel_they_started_on(api: httpx.AsyncClient, deps: Deps) -> None:
    from bot import control
    from bot.events import ChannelRef

    mine = (await api.post("/api/v1/threads", json=LAUNCH, headers=auth("ops"))).json()["thread_id"]
    terminal = ChannelRef(kind="terminal", address="t", user="terminal:x")
    chat = await control.launch(deps, "refund-desk", "hello", terminal)
    for tid in (mine, chat.thread_id):
        await wait_for(deps, tid, status_is(Status.DONE))
    for kind, expected in (("api", mine), ("terminal", chat.thread_id)):
        page = (await api.get(f"/api/v1/threads?channel={kind}", headers=auth("reader"))).json()
        assert [t["id"] for t in page["items"]] == [expected], kind
    assert (await api.get("/api/v1/threads?channel=fax", headers=auth("reader"))).json()["items"] == []
