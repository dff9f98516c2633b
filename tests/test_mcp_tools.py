"""MCP servers as tools: an LLM agent calls a tool of a real MCP server (tests/mcp_tool_server.py, over stdio)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot import control
from bot.events import ApprovalRequested, ChannelRef, Error, ToolResult
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for
from tests.scripted_model import ScriptedModel, call, text

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


def recorded(calls: Path) -> list[dict[str, Any]]:
    """The deploy calls the server has seen."""
    return [json.loads(line) for line in calls.read_text().splitlines()]


@pytest.fixture(autouse=True)
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the test server records its deploy calls in (set before the config is loaded)."""
    path = tmp_path / "calls.jsonl"
    path.touch()
    monkeypatch.setenv("TEST_MCP_CALLS", str(path))
    monkeypatch.setenv("TEST_MCP_DOWN", str(tmp_path / "down"))
    monkeypatch.setenv("TEST_MCP_EXTRA", str(tmp_path / "extra"))
    return path


async def test_a_gated_mcp_tool_waits_for_approval_and_runs_once(
    deps: Deps, start_worker: Any, model: ScriptedModel, calls: Path
) -> None:
    model.add(call("ops__deploy", {"env": "prod", "replicas": 2}), text("Deployed to prod."))
    await start_worker()
    thread_id = (await control.launch(deps, "ops-bot", "deploy to prod with 2 replicas", ALICE)).thread_id
    thread = await wait_for(deps, thread_id, status_is(Status.WAITING_APPROVAL), timeout=30)
    offered = {t["function"]["name"]: t["function"] for t in model.requests[0]["tools"]}
    assert offered["ops__deploy"]["parameters"]["properties"] == {
        "env": {"title": "Env", "type": "string"}, "replicas": {"default": 1, "title": "Replicas", "type": "integer"},
    }  # fmt: skip
    assert "ops__status" in offered
    request = next(e for e in thread.events if isinstance(e, ApprovalRequested))
    assert (request.tool, request.approvers) == ("ops.deploy", ["terminal:alice"])
    assert recorded(calls) == []  # nothing ran before the approval
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, thread_id, status_is(Status.DONE), timeout=30)
    result = next(e for e in thread.events if isinstance(e, ToolResult))
    assert (result.ok, result.result) == (True, {"deployed": "prod", "replicas": 2})
    assert recorded(calls) == [{"env": "prod", "replicas": 2}]  # exactly once


async def test_invalid_arguments_are_refused_by_the_servers_schema_and_a_server_down_is_a_failed_call(
    deps: Deps, start_worker: Any, model: ScriptedModel, calls: Path, tmp_path: Path
) -> None:
    """Arguments that do not match the server's schema never reach it; an ungated call to a server that is down
    is a compact failed result the model reads, and the thread goes on."""

    def server_goes_down(body: dict[str, Any]) -> dict[str, Any]:
        (tmp_path / "down").touch()  # its tools were listed before the first model call; now it will not start
        return call("ops__status", {})

    model.add(call("ops__deploy", {"env": 5}), server_goes_down, text("The server is down."))
    await start_worker()
    thread_id = (await control.launch(deps, "ops-bot", "deploy", ALICE)).thread_id
    thread = await wait_for(deps, thread_id, status_is(Status.DONE), timeout=30)
    error = next(e for e in thread.events if isinstance(e, Error))
    assert (error.kind, error.message) == (
        "invalid_arguments", "ops.deploy: args: Value error, env: 5 is not of type 'string'"
    )  # fmt: skip
    failed = next(e for e in thread.events if isinstance(e, ToolResult))
    assert not failed.ok and failed.error.startswith("ConnectionError: MCP server 'ops': ")
    assert len(failed.error) < 400
    assert recorded(calls) == []


async def test_a_server_that_says_its_tools_changed_is_listed_again_before_the_next_step(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(call("ops__enable_rollback", {}), call("ops__rollback", {"version": "1.4"}), text("Rolled back."))
    await start_worker()
    thread_id = (await control.launch(deps, "ops-bot", "roll back to 1.4", ALICE)).thread_id
    thread = await wait_for(deps, thread_id, status_is(Status.DONE), timeout=30)
    offered = [{t["function"]["name"] for t in r["tools"]} for r in model.requests]
    assert "ops__rollback" not in offered[0] and "ops__rollback" in offered[1], "listed again after the notice"
    results = [e for e in thread.events if isinstance(e, ToolResult)]
    assert [(r.ok, r.result) for r in results] == [
        (True, {"result": "rollback is available"}), (True, {"result": "rolled back to 1.4"})
    ]  # fmt: skip
