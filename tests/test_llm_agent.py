"""The LLM agent through litellm's real HTTP path, against a local scripted OpenAI-compatible server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot import control
from bot.events import ChannelRef, Error, HumanAsked, Reply, ThreadFailed, ToolCall, ToolResult
from bot.outbox import Outbound
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import status_is, wait_for
from tests.scripted_model import ScriptedModel, call, text

ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")


def user_prompt(request: dict[str, Any]) -> str:
    return str(request["messages"][1]["content"])


async def test_llm_agent_asks_approval_runs_the_approved_call_and_replies(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(
        call("lookup_order", {"order_id": "A102"}),
        call("issue_refund", {"order_id": "A102", "amount_cents": 5000}),
        call("reply", {"text": "Refunded $50.00 on your standing desk."}),
    )
    await start_worker()
    accepted = await control.launch(deps, "support", "please refund $50 of order A102", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=30)
    request = thread.open_approval()
    assert request is not None and request.args == {"order_id": "A102", "amount_cents": 5000}
    await control.decide(deps, request.approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE))

    assert isinstance(thread.events[-1], Reply) and thread.events[-1].text == "Refunded $50.00 on your standing desk."
    assert len(model.requests) == 3
    first = model.requests[0]
    assert first["model"] == "gpt-4o-mini" and first["tool_choice"] == "required"
    assert {t["function"]["name"] for t in first["tools"]} == {
        "lookup_order", "issue_refund", "refund_policy", "reply", "ask_human"
    }  # fmt: skip
    refund_schema = next(t for t in first["tools"] if t["function"]["name"] == "issue_refund")["function"]
    assert refund_schema["parameters"]["required"] == ["order_id", "amount_cents"]
    # the pre-fetch tool ran before the first model call, and its result is in the first prompt
    assert "<tool_result>\nid: prefetch-0\nresult: Refunds up to the order total" in user_prompt(first)
    assert (
        "<message_received>\nfrom: terminal:alice\ntext: please refund $50 of order A102\n</message_received>"
        in user_prompt(first)
    )
    assert "decision: approved\nby: terminal:alice" in user_prompt(model.requests[2])

    steps = [e for e in thread.events if getattr(e, "llm", None) is not None]
    assert [e.type for e in steps] == ["tool.call", "tool.call", "reply"]
    for e in steps:
        llm = e.llm  # type: ignore[union-attr]
        assert llm.tokens_in > 0 and llm.tokens_out == 20 and llm.cost > 0
        assert json.loads(llm.raw)["tool_calls"][0]["name"] in {"lookup_order", "issue_refund", "reply"}
    # each recorded step can be re-rendered to exactly what was sent
    for i, e in enumerate(thread.events):
        if getattr(e, "llm", None) is not None:
            sent = control.prompt_of(deps, thread, i)
            assert sent is not None and sent.verified
    first_sent = control.prompt_of(deps, thread, thread.events.index(steps[0]))
    assert first_sent is not None and first_sent.messages == first["messages"]


async def test_rejection_feedback_goes_into_the_context_and_the_model_replans(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(
        call("issue_refund", {"order_id": "A100", "amount_cents": 12900}),
        call("issue_refund", {"order_id": "A100", "amount_cents": 6450}),
        call("reply", {"text": "Refunded half."}),
    )
    await start_worker()
    accepted = await control.launch(deps, "support", "refund A100", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL), timeout=30)
    first = thread.open_approval()
    assert first is not None
    await control.decide(deps, first.approval_id, by="terminal:alice", approved=False, feedback="refund half only")
    thread = await wait_for(
        deps, accepted.thread_id, lambda t: (r := t.open_approval()) is not None and r.approval_id != first.approval_id
    )
    assert "decision: rejected\nby: terminal:alice\nfeedback: refund half only" in user_prompt(model.requests[1])
    second = thread.open_approval()
    assert second is not None and second.args["amount_cents"] == 6450
    await control.decide(deps, second.approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE))
    assert [v.split(b":")[1] for v in (await deps.redis.hgetall(f"{deps.keys.ns}:refunds")).values()] == [b"6450"]


async def test_three_malformed_answers_escalate_to_a_human(deps: Deps, start_worker: Any, model: ScriptedModel) -> None:
    model.add(
        call("lookup_order", '{"order_id": "A1'),  # broken JSON
        call("delete_database", {}),  # no such tool
        call("issue_refund", {"order_id": "A100", "amount_cents": -5}),  # invalid arguments
    )
    await start_worker()
    accepted = await control.launch(deps, "support", "refund A100", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_HUMAN), timeout=30)
    errors = [e for e in thread.events if isinstance(e, Error)]
    assert [e.kind for e in errors] == ["bad_json", "unknown_tool", "invalid_arguments"]
    assert errors[2].message == "issue_refund: amount_cents: Input should be greater than 0"
    asked = thread.events[-1]
    assert isinstance(asked, HumanAsked) and asked.escalation
    assert asked.question.startswith("I could not produce a valid next step 3 times in a row")
    assert len(model.requests) == 3, "no fourth try"
    # each error was shown to the model on the next try
    assert "<error>\nkind: bad_json" in user_prompt(model.requests[1])
    assert not any(isinstance(e, ToolCall) and e.tool == "issue_refund" for e in thread.events)
    said = [Outbound.model_validate_json(f[b"m"]) for _, f in await deps.redis.xrange(deps.keys.outbox("terminal"))]
    assert [m.kind for m in said] == ["question"]

    # the human answers, the model recovers, and the resolved errors leave the context
    model.add(call("reply", {"text": "Sorry about that. Which amount?"}))
    await control.send(deps, accepted.thread_id, "the whole order please", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=10)
    assert "<error>" not in user_prompt(model.requests[3])


async def test_a_repeated_identical_call_is_an_error_not_a_loop(
    deps: Deps, start_worker: Any, model: ScriptedModel
) -> None:
    model.add(*[call("lookup_order", {"order_id": "A100"})] * 4)
    await start_worker()
    accepted = await control.launch(deps, "support", "tell me about A100", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_HUMAN), timeout=30)
    assert sum(isinstance(e, ToolResult) and e.call_id != "prefetch-0" for e in thread.events) == 1
    assert [e.kind for e in thread.events if isinstance(e, Error)] == ["repeated_call"] * 3


async def test_step_limit_stops_a_busy_agent(deps: Deps, start_worker: Any, model: ScriptedModel) -> None:
    orders = ["A100", "A101", "A102", "A100x", "A101x", "A102x", "A103"]
    model.add(*[call("lookup_order", {"order_id": o}) for o in orders])
    await start_worker()
    accepted = await control.launch(deps, "support", "look everything up", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_HUMAN), timeout=30)
    asked = thread.events[-1]
    assert isinstance(asked, HumanAsked) and asked.escalation and "6 steps" in asked.question
    assert len(model.requests) == 6  # max_steps of the support agent in tests/config


async def test_without_a_model_key_the_agent_says_which_variable_to_set(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch, model: ScriptedModel
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    await start_worker()
    accepted = await control.launch(deps, "keyless", "hello", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.FAILED), timeout=30)
    failed = thread.events[-1]
    assert isinstance(failed, ThreadFailed)
    assert "set OPENAI_API_KEY in the environment" in failed.reason
    said = [Outbound.model_validate_json(f[b"m"]) for _, f in await deps.redis.xrange(deps.keys.outbox("terminal"))]
    assert [(m.kind, m.text) for m in said] == [("error", failed.reason)]
    assert model.requests == []
    # a deterministic agent works all the same
    other = await control.launch(deps, "refund-desk", "refund A100", ALICE)
    await wait_for(deps, other.thread_id, status_is(Status.WAITING_APPROVAL))
    # and with the key set, resuming the thread gives it another go
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_BASE", model.url)  # the provider's default endpoint, here the scripted one
    model.add(text("Hello! How can I help?"))
    await control.resume(deps, accepted.thread_id, "terminal:alice")
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=10)
    assert thread.events[-1].text == "Hello! How can I help?"  # type: ignore[union-attr]
