"""Handrail as an MCP server: a real MCP client (the official SDK) over Streamable HTTP and over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from bot import control, threads
from bot.runtime import Deps
from bot.threads import Status
from channels.mcp import server as mcp_server
from tests.conftest import ROOT, status_is, wait_for, web_client

OPS = "sk-ops-mcp-0123456789"
READER = "sk-reader-mcp-0123456789"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_API_KEY_OPS", OPS)
    monkeypatch.setenv("TEST_API_KEY_READER", READER)


@contextlib.asynccontextmanager
async def http_session(web: httpx.AsyncClient, key: str | None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(f"{web.base_url.join('/mcp')}", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def pending_approval(web: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, Any]:
    """The one approval waiting in the REST API, once it is there."""
    for _ in range(int(timeout / 0.05)):
        items = (await web.get("/api/v1/approvals", headers={"Authorization": f"Bearer {OPS}"})).json()["items"]
        if items:
            assert len(items) == 1
            return dict(items[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no approval appeared in the REST API")


async def decide(web: httpx.AsyncClient, approval_id: str, **body: Any) -> None:
    answer = await web.post(f"/api/v1/approvals/{approval_id}/decision", json=body,
                            headers={"Authorization": f"Bearer {OPS}"})  # fmt: skip
    assert answer.status_code == 200, answer.text


async def test_http_request_approval_waits_for_the_decision_made_in_the_rest_api(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    async with web_client(deps) as web, http_session(web, OPS) as mcp:
        call = asyncio.create_task(mcp.call_tool(
            "request_approval", {"action": "deploy v2 to prod", "arguments": {"env": "prod", "version": "2"}}
        ))  # fmt: skip
        approval = await pending_approval(web)
        assert (approval["tool"], approval["args"], approval["reason"]) == (
            "approved_action", {"action": "deploy v2 to prod", "arguments": {"env": "prod", "version": "2"}},
            "deploy v2 to prod",
        )  # fmt: skip
        assert not call.done()
        await decide(web, approval["id"], approved=True)
        result = await asyncio.wait_for(call, 10)
    assert not result.is_error
    assert result.structured_content == {
        "request_id": approval["thread_id"], "status": "approved", "by": "api:ops", "feedback": "",
        "arguments": {"env": "prod", "version": "2"}, "edited": False, "answer": "", "choice": None,
        "at": result.structured_content["at"],
    }  # fmt: skip


async def test_http_rejection_returns_the_feedback_and_edited_args_come_back(deps: Deps, start_worker: Any) -> None:
    await start_worker()
    async with web_client(deps) as web, http_session(web, OPS) as mcp:
        call = asyncio.create_task(mcp.call_tool("request_approval", {"action": "drop table users"}))
        await decide(web, (await pending_approval(web))["id"], approved=False, feedback="never on a Friday")
        rejected = (await asyncio.wait_for(call, 10)).structured_content
        call = asyncio.create_task(mcp.call_tool("request_approval", {"action": "scale", "arguments": {"n": 10}}))
        edited = {"action": "scale", "arguments": {"n": 3}}
        await decide(web, (await pending_approval(web))["id"], approved=True, args=edited)
        approved = (await asyncio.wait_for(call, 10)).structured_content
    assert (rejected["status"], rejected["by"], rejected["feedback"]) == ("rejected", "api:ops", "never on a Friday")
    assert (approved["status"], approved["arguments"], approved["edited"]) == ("approved", {"n": 3}, True)


async def test_a_retried_request_with_its_key_finds_the_first_one_instead_of_asking_again(
    deps: Deps, start_worker: Any
) -> None:
    await start_worker()
    deploy = {"action": "deploy v3", "arguments": {"env": "prod"}, "request_key": "deploy-v3", "wait": False}
    async with web_client(deps) as web:
        async with http_session(web, OPS) as mcp:
            first = (await mcp.call_tool("request_approval", deploy)).structured_content
        approval = await pending_approval(web)  # exactly one, however often it is asked
        async with http_session(web, OPS) as mcp:  # a client that timed out and reconnected asks again
            again = (await mcp.call_tool("request_approval", deploy)).structured_content
            assert again["request_id"] == first["request_id"] == approval["thread_id"]
            assert len((await web.get("/api/v1/approvals", headers={"Authorization": f"Bearer {OPS}"})
                        ).json()["items"]) == 1  # fmt: skip
            other = (await mcp.call_tool("request_approval", deploy | {"arguments": {"env": "dev"}})).structured_content
            assert other["request_id"] != first["request_id"], "another request under the same key is a new one"
            await decide(web, approval["id"], approved=True)
            done = (await mcp.call_tool("request_approval", deploy | {"wait": True, "timeout": 10})).structured_content
    assert (done["request_id"], done["status"], done["by"]) == (first["request_id"], "approved", "api:ops")


async def test_http_without_a_valid_key_is_refused_and_opens_nothing(deps: Deps) -> None:
    async with web_client(deps) as web:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {OPS}"}):
            answer = await web.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"] == "Bearer"
        # a read-only key may look up decisions, not open requests
        async with http_session(web, READER) as mcp:
            refused = await mcp.call_tool("request_approval", {"action": "deploy", "wait": False})
    assert refused.is_error
    assert "lacks the 'launch' scope" in refused.content[0].text  # type: ignore[union-attr]
    assert await deps.redis.zcard(deps.keys.threads) == 0


async def test_approvers_outside_the_policy_are_refused_and_listed_ones_are_asked(
    deps: Deps, start_worker: Any
) -> None:
    await start_worker()
    async with web_client(deps) as web, http_session(web, OPS) as mcp:
        refused = await mcp.call_tool("request_approval", {"action": "deploy", "approvers": ["slack:UMALLORY"]})
        opened = await mcp.call_tool(
            "request_approval", {"action": "deploy", "approvers": ["api:ops"], "wait": False}
        )  # fmt: skip
        approval = await pending_approval(web)  # the only one: the refused request opened nothing
    assert refused.is_error and "slack:UMALLORY" in refused.content[0].text  # type: ignore[union-attr]
    assert opened.structured_content["status"] == "pending"
    assert (approval["thread_id"], approval["approvers"]) == (opened.structured_content["request_id"], ["api:ops"])


async def test_a_client_that_reconnects_gets_the_decision_with_get_decision(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wait=false returns a request id; a new session (after a disconnect) waits for it and gets the decision,
    with progress notifications meanwhile."""
    monkeypatch.setattr(mcp_server, "PROGRESS_EVERY", 0.2)
    await start_worker()
    async with web_client(deps) as web:
        async with http_session(web, OPS) as mcp:
            first = await mcp.call_tool("ask_human", {"question": "Ship it?", "choices": ["yes", "no"], "wait": False})
        request_id = first.structured_content["request_id"]
        assert first.structured_content["status"] == "pending"
        progress: list[float] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(done)

        async with http_session(web, READER) as again:
            call = asyncio.create_task(again.call_tool("get_decision", {"request_id": request_id, "timeout": 30},
                                                       progress_callback=on_progress))  # fmt: skip
            await wait_for(deps, request_id, status_is(Status.WAITING_HUMAN))
            await asyncio.sleep(0.5)
            answer = await web.post(f"/api/v1/threads/{request_id}/answer", json={"text": "Yes"},
                                    headers={"Authorization": f"Bearer {OPS}"})  # fmt: skip
            assert answer.status_code == 202
            got = (await asyncio.wait_for(call, 10)).structured_content
            unknown = await again.call_tool("get_decision", {"request_id": "no-such-request"})
    assert (got["status"], got["answer"], got["choice"], got["by"]) == ("answered", "Yes", "yes", "api:ops")
    assert progress, "no progress notification while waiting"
    assert unknown.is_error


async def test_stdio_server_runs_as_the_terminal_user(deps: Deps, start_worker: Any,
                                                      env_for: Callable[..., dict[str, str]]) -> None:  # fmt: skip
    """`handrail mcp` over stdio: request_approval → the approval is in the API → approved → the client has it."""
    await start_worker()
    params = StdioServerParameters(command=sys.executable, args=["-m", "bot.cli", "mcp", "--as", "terminal:bob"],
                                   env=env_for(), cwd=str(ROOT))  # fmt: skip
    async with web_client(deps) as web:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as mcp:
            await mcp.initialize()
            tools = sorted(t.name for t in (await mcp.list_tools()).tools)
            call = asyncio.create_task(mcp.call_tool("request_approval", {"action": "rm -rf build/"}))
            approval = await pending_approval(web, timeout=30)
            await decide(web, approval["id"], approved=False, feedback="keep the build")
            result = (await asyncio.wait_for(call, 10)).structured_content
    assert tools == ["ask_human", "get_decision", "request_approval"]
    assert (result["status"], result["feedback"]) == ("rejected", "keep the build")
    thread = await control.threads_page(deps, agent="mcp-desk")
    assert len(thread.items) == 1
    launched = (await threads.get(deps.redis, deps.keys, thread.items[0].id)).launched
    assert launched is not None and launched.ref is not None and launched.ref.user == "terminal:bob"


def test_a_request_reads_pending_until_decided_and_cancelled_when_cancelled() -> None:
    """The decision is read from the log alone: nothing yet is pending; a cancel (with the approval open) is
    cancelled, with who cancelled it; a policy never widens to approvers it does not name."""
    from agents.mcp import human_gate
    from bot.agent import ApprovalPolicy, CallTool
    from bot.events import ChannelRef, MessageReceived, ThreadCancelled, ThreadLaunched
    from channels.mcp.outcome import decision

    ref = ChannelRef(kind="mcp", address="api:ops", user="api:ops")
    text = '{"request": "approval", "action": "deploy", "arguments": {"v": 2}, "approvers": ["api:ops"]}'
    events = [ThreadLaunched(thread_id="t", agent="mcp-desk", ref=ref), MessageReceived(thread_id="t", text=text)]
    assert decision("t", []).status == "pending"
    assert decision("t", events).status == "pending"
    assert human_gate(events) == CallTool("approved_action", {"action": "deploy", "arguments": {"v": 2}},
                                          reason="deploy", approvers=("api:ops",))  # fmt: skip
    cancelled = decision("t", [*events, ThreadCancelled(thread_id="t", by="terminal:alice")])
    assert (cancelled.status, cancelled.by) == ("cancelled", "terminal:alice")
    policy = ApprovalPolicy(("api:ops", "terminal:*"))
    assert policy.narrowed(["terminal:bob", "slack:UMALLORY"]) == ("terminal:bob",)
    assert policy.narrowed(["slack:UMALLORY"]) == policy.narrowed([]) == ("api:ops", "terminal:*")


async def test_an_approval_asked_in_slack_is_decided_with_the_button(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """channel: slack:C... puts the card in Slack (the fake Web API); the approver's click is the decision the
    MCP client gets. A key may ask only on the channels it is allowed."""
    from tests.test_slack import rig

    monkeypatch.setenv("TEST_API_KEY_MCP", "sk-mcp-client-0123456789")
    async with rig(deps, monkeypatch, start_worker) as slack:
        async with http_session(slack.http, OPS) as ops:  # the ops key may talk on the API only
            refused = await ops.call_tool("request_approval", {"action": "deploy", "channel": "slack:CDEPLOY"})
        async with http_session(slack.http, "sk-mcp-client-0123456789") as mcp:
            call = asyncio.create_task(mcp.call_tool("request_approval", {
                "action": "deploy v2", "arguments": {"env": "prod"}, "approvers": ["slack:UALICE"],
                "channel": "slack:CDEPLOY",
            }))  # fmt: skip
            [card] = await slack.posted(1)
            assert card.params["channel"] == "CDEPLOY"
            assert "<@UALICE>" in json.dumps(card.params["blocks"])
            approval_id = card.params["blocks"][-1]["block_id"].removeprefix("approval:")
            assert (await slack.click("handrail_approve", approval_id, "UALICE", card)).status_code == 200
            result = (await asyncio.wait_for(call, 10)).structured_content
    assert refused.is_error and "may not ask on slack:CDEPLOY" in refused.content[0].text  # type: ignore[union-attr]
    assert (result["status"], result["by"], result["arguments"]) == ("approved", "slack:UALICE", {"env": "prod"})
