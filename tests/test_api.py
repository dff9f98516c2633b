"""The REST API over real HTTP (uvicorn on a port-0 socket), with real Redis and an in-process worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bot import threads
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for, web_client

KEYS = {
    "ops": "sk-ops-0123456789", "reader": "sk-reader-0123456789", "intern": "sk-intern-0123456789",
    "narrow": "sk-narrow-0123456789",
}  # fmt: skip


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
async def api(deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the web app served by uvicorn on a free port, with a worker running."""
    for name, key in KEYS.items():
        monkeypatch.setenv(f"TEST_API_KEY_{name.upper()}", key)
    await start_worker()
    async with web_client(deps) as client:
        yield client


async def launch(api: httpx.AsyncClient, text: str = "refund A100 25", **extra: Any) -> str:
    r = await api.post("/api/v1/threads", json={"agent": "refund-desk", "message": text, **extra}, headers=auth("ops"))
    assert r.status_code == 202, r.text
    return str(r.json()["thread_id"])


async def test_launch_decide_and_read_a_thread_over_http(api: httpx.AsyncClient, deps: Deps) -> None:
    tid = await launch(api)
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    r = await api.get("/api/v1/approvals", headers=auth("reader"))
    assert r.json()["next"] is None
    [pending] = r.json()["items"]
    assert (pending["thread_id"], pending["tool"], pending["args"]) == (
        tid, "issue_refund", {"order_id": "A100", "amount_cents": 2500}
    )  # fmt: skip
    r = await api.post(f"/api/v1/approvals/{pending['id']}/decision", json={"approved": True}, headers=auth("ops"))
    assert r.status_code == 200 and r.json()["state"] == "approved" and r.json()["by"] == "api:ops"
    await wait_for(deps, tid, status_is(Status.DONE))

    r = await api.get(f"/api/v1/threads/{tid}", headers=auth("reader"))
    body = r.json()
    assert body["status"] == "done" and body["agent"] == "refund-desk"
    assert [e["type"] for e in body["events_log"]][-3:] == ["tool.started", "tool.result", "reply"]
    assert body["events_log"][0]["ref"] == {"kind": "api", "address": "ops", "user": "api:ops"}
    listed = (await api.get("/api/v1/threads", params={"status": "done"}, headers=auth("reader"))).json()
    assert [t["id"] for t in listed["items"]] == [tid] and listed["next"] is None
    # the API origin has no delivery process: nothing piles up in an outbox no one reads
    assert await deps.redis.xlen(deps.keys.outbox("api")) == 0

    again = await api.post(f"/api/v1/approvals/{pending['id']}/decision", json={"approved": False}, headers=auth("ops"))
    assert again.status_code == 409
    assert again.json()["detail"].startswith("already approved by api:ops at ")

    # one approval, after its decision: the full call from the thread's log, and who decided
    one = (await api.get(f"/api/v1/approvals/{pending['id']}", headers=auth("reader"))).json()
    assert {k: one[k] for k in ("thread_id", "tool", "args", "state", "by")} == {
        "thread_id": tid, "tool": "issue_refund", "args": {"order_id": "A100", "amount_cents": 2500},
        "state": "approved", "by": "api:ops",
    }  # fmt: skip
    assert (await api.get("/api/v1/approvals/nope", headers=auth("reader"))).status_code == 404


async def test_the_same_idempotency_key_twice_makes_one_thread(api: httpx.AsyncClient, deps: Deps) -> None:
    body = {"agent": "refund-desk", "message": "refund A101"}
    headers = auth("ops") | {"Idempotency-Key": "order-A101-refund"}
    first = await api.post("/api/v1/threads", json=body, headers=headers)
    second = await api.post("/api/v1/threads", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(await threads.recent_ids(deps.redis, deps.keys)) <= 1
    await wait_for(deps, first.json()["thread_id"], status_is(Status.WAITING_APPROVAL))
    assert len(await threads.recent_ids(deps.redis, deps.keys)) == 1
    reused = await api.post("/api/v1/threads", json=body | {"message": "refund A102"}, headers=headers)
    assert reused.status_code == 422 and "different request" in reused.json()["detail"]


async def test_a_business_key_continues_the_same_thread(api: httpx.AsyncClient, deps: Deps) -> None:
    one = await launch(api, "hello", business_key="TICKET-7")
    await wait_for(deps, one, status_is(Status.DONE))
    two = await launch(api, "refund A102", business_key="TICKET-7")
    assert one == two == "refund-desk.TICKET-7"
    thread = await wait_for(deps, one, status_is(Status.WAITING_APPROVAL))
    assert [e.text for e in thread.events if e.type == "message.received"] == ["hello", "refund A102"]  # type: ignore[union-attr]
    assert thread.launched is not None and thread.launched.business_key == "TICKET-7"


async def test_pause_resume_cancel_and_messages(api: httpx.AsyncClient, deps: Deps) -> None:
    tid = await launch(api, "hello")
    await wait_for(deps, tid, status_is(Status.DONE))
    for verb, status in [("pause", Status.PAUSED), ("resume", Status.DONE)]:
        assert (await api.post(f"/api/v1/threads/{tid}/{verb}", headers=auth("ops"))).status_code == 202
        await wait_for(deps, tid, status_is(status))
    r = await api.post(f"/api/v1/threads/{tid}/messages", json={"text": "refund A100"}, headers=auth("ops"))
    assert r.status_code == 202
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    answer = await api.post(f"/api/v1/threads/{tid}/answer", json={"text": "yes"}, headers=auth("ops"))
    assert answer.status_code == 409 and "not waiting for an answer" in answer.json()["detail"]
    assert (await api.post(f"/api/v1/threads/{tid}/cancel", headers=auth("ops"))).status_code == 202
    await wait_for(deps, tid, status_is(Status.CANCELLED))


async def test_a_human_question_is_answered_through_the_api(api: httpx.AsyncClient, deps: Deps, model: Any) -> None:
    from tests.scripted_model import call

    model.add(call("ask_human", {"question": "Which order?"}), call("reply", {"text": "Looking at A100."}))
    r = await api.post("/api/v1/threads", json={"agent": "support", "message": "refund please"}, headers=auth("ops"))
    tid = r.json()["thread_id"]
    await wait_for(deps, tid, status_is(Status.WAITING_HUMAN), timeout=30)
    r = await api.post(f"/api/v1/threads/{tid}/answer", json={"text": "A100"}, headers=auth("ops"))
    assert r.status_code == 202
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    answered = next(e for e in thread.events if e.type == "human.answered")
    assert (answered.text, answered.by) == ("A100", "api:ops")  # type: ignore[union-attr]
    assert "<human_answered>\nby: api:ops\ntext: A100" in model.requests[1]["messages"][1]["content"]


async def test_keys_and_scopes_are_enforced(api: httpx.AsyncClient, deps: Deps) -> None:
    body = {"agent": "refund-desk", "message": "refund A100"}
    assert (await api.post("/api/v1/threads", json=body)).status_code == 401
    wrong = await api.post("/api/v1/threads", json=body, headers={"Authorization": "Bearer sk-ops-0123456788"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert (await api.post("/api/v1/threads", json=body, headers=auth("reader"))).status_code == 403
    assert await threads.recent_ids(deps.redis, deps.keys) == []
    tid = await launch(api)
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    approval = thread.open_approval()
    assert approval is not None
    url = f"/api/v1/approvals/{approval.approval_id}/decision"
    assert (await api.post(url, json={"approved": True}, headers=auth("reader"))).status_code == 403
    r = await api.post(url, json={"approved": True}, headers=auth("intern"))
    assert r.status_code == 403 and r.json()["detail"] == "api:intern may not decide this approval"
    assert (await api.get("/api/v1/approvals", headers=auth("reader"))).json()["items"][0]["id"] == approval.approval_id


async def test_bad_input_gets_a_clear_error_and_changes_nothing(api: httpx.AsyncClient, deps: Deps) -> None:
    h = auth("ops")
    bad_json = await api.post("/api/v1/threads", content=b"{not json", headers=h | {"Content-Type": "application/json"})
    assert bad_json.status_code == 422
    missing = await api.post("/api/v1/threads", json={"agent": "refund-desk"}, headers=h)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "message"]
    unknown_agent = await api.post("/api/v1/threads", json={"agent": "nope", "message": "x"}, headers=h)
    assert unknown_agent.status_code == 422 and "no agent 'nope'" in unknown_agent.json()["detail"]
    assert (await api.get("/api/v1/threads/nope", headers=h)).status_code == 404
    assert (await api.post("/api/v1/threads/nope/pause", headers=h)).status_code == 404
    assert (await api.post("/api/v1/approvals/nope/decision", json={"approved": True}, headers=h)).status_code == 404
    huge = await api.post("/api/v1/threads", json={"agent": "refund-desk", "message": "x" * 300_000}, headers=h)
    assert huge.status_code == 413
    assert await threads.recent_ids(deps.redis, deps.keys) == []

    tid = await launch(api)
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    approval = thread.open_approval()
    assert approval is not None
    edit = {"approved": True, "args": {"order_id": "A100", "amount_cents": -1}}
    r = await api.post(f"/api/v1/approvals/{approval.approval_id}/decision", json=edit, headers=h)
    assert r.status_code == 422 and "edited arguments for issue_refund are invalid" in r.json()["detail"]
    assert (await threads.load(deps.redis, deps.keys, tid)).status is Status.WAITING_APPROVAL


async def test_health_readiness_and_openapi(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"ok": True}
    assert (await api.get("/readyz")).json() == {"ready": True}
    spec = (await api.get("/api/v1/openapi.json")).json()
    assert {"/api/v1/threads", "/api/v1/approvals/{approval_id}/decision", "/api/v1/threads/{thread_id}/answer"} <= set(
        spec["paths"]
    )
    assert (await api.get("/api/v1/docs")).status_code == 200
