"""Events: validation at the boundary, the compact encoding, and the status derived from a log."""

from __future__ import annotations

import pydantic
import pytest

from bot import codec
from bot.context import render
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    ChannelRef,
    Error,
    LLMInfo,
    MessageReceived,
    Reply,
    ThreadLaunched,
    ThreadPaused,
    ThreadResumed,
    ToolCall,
    args_hash,
    parse_event,
)
from bot.threads import Status, derive_status

REF = ChannelRef(kind="terminal", address="s1", user="terminal:alice")


def launched() -> ThreadLaunched:
    return ThreadLaunched(thread_id="t1", key="launch:t1", agent="desk", ref=REF)


def test_every_event_round_trips_through_the_compact_encoding() -> None:
    events = [
        launched(),
        MessageReceived(thread_id="t1", key="m1", text="refund A100 " * 20, user="terminal:alice", ref=REF),
        ToolCall(thread_id="t1", call_id="c1", tool="issue_refund", args={"order_id": "A100", "amount_cents": 5},
                 llm=LLMInfo(model="openai/gpt-4o-mini", raw='{"x":1}', tokens_in=10, tokens_out=2, cost=0.001)),
        ApprovalDecided(thread_id="t1", key="approval:c1", approval_id="c1", approved=False, by="api:ops",
                        feedback="no"),
        Reply(thread_id="t1", text="done"),
    ]  # fmt: skip
    for e in events:
        blob = codec.encode(e)
        assert codec.decode(blob, "t1") == e
        with pytest.raises(pydantic.ValidationError, match="thread_id"):
            codec.decode(blob)  # the thread id is not stored: the log's key implies it


def test_the_encoding_is_smaller_than_the_json() -> None:
    e = MessageReceived(
        thread_id="t1",
        key="slack:Ev0123456789",
        text="Please refund order A100, the keyboard arrived broken and the customer wants their money back today.",
        user="slack:U012",
        ref=REF,
    )
    assert len(codec.encode(e)) < 0.8 * len(e.model_dump_json())


def test_a_malformed_event_is_rejected_with_a_reason() -> None:
    with pytest.raises(pydantic.ValidationError, match="type"):
        parse_event({"thread_id": "t1", "type": "message.exploded"})
    with pytest.raises(pydantic.ValidationError, match="text"):
        parse_event({"thread_id": "t1", "type": "message.received"})
    with pytest.raises(ValueError, match="unknown event encoding"):
        codec.decode(b"?{}")


def test_args_hash_binds_the_tool_and_the_exact_arguments() -> None:
    a = args_hash("issue_refund", {"order_id": "A100", "amount_cents": 5})
    assert a == args_hash("issue_refund", {"amount_cents": 5, "order_id": "A100"})
    assert a != args_hash("issue_refund", {"order_id": "A100", "amount_cents": 6})
    assert a != args_hash("other_tool", {"order_id": "A100", "amount_cents": 5})


def request(call_id: str = "c1") -> ApprovalRequested:
    return ApprovalRequested(thread_id="t1", approval_id=call_id, call_id=call_id, tool="t", args={}, args_hash="h",
                             approvers=["terminal:*"])  # fmt: skip


def test_status_is_derived_from_the_log() -> None:
    msg = MessageReceived(thread_id="t1", key="m1", text="hi")
    decided = ApprovalDecided(thread_id="t1", key="a", approval_id="c1", approved=True, by="x")
    assert derive_status([launched(), msg]) is Status.RUNNING
    assert derive_status([launched(), msg, request()]) is Status.WAITING_APPROVAL
    # a message while an approval is open does not resume the thread
    assert derive_status([launched(), msg, request(), msg]) is Status.WAITING_APPROVAL
    assert derive_status([launched(), msg, request(), decided]) is Status.RUNNING
    assert derive_status([launched(), msg, Reply(thread_id="t1", text="ok")]) is Status.DONE
    paused = [launched(), msg, request(), ThreadPaused(thread_id="t1", key="p")]
    assert derive_status(paused) is Status.PAUSED
    assert derive_status([*paused, ThreadResumed(thread_id="t1", key="r")]) is Status.WAITING_APPROVAL


def test_the_context_hides_bookkeeping_and_resolved_errors() -> None:
    msg = MessageReceived(thread_id="t1", key="m1", text="refund A100", user="terminal:alice")
    err = Error(thread_id="t1", kind="bad_json", message="oops")
    call = ToolCall(thread_id="t1", call_id="c1", tool="lookup_order", args={"order_id": "A100"})
    assert render([launched(), msg, err]) == (
        "<message_received>\nfrom: terminal:alice\ntext: refund A100\n</message_received>\n\n"
        "<error>\nkind: bad_json\nmessage: oops\n</error>"
    )
    assert "<error>" not in render([launched(), msg, err, call])
    assert "thread_launched" not in render([launched(), msg])
