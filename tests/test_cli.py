"""The ``handrail`` command as a user runs it: subprocesses sharing the test's Redis namespace, a worker running."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bot import approvals, control, threads
from bot.events import ApprovalRequested, ChannelRef, Reply
from bot.runtime import Deps
from bot.threads import Status
from tests.conftest import ROOT, python, status_is, wait_for
from tests.scripted_model import ScriptedModel, call
from tests.slow_agent import FAIL

Env = Callable[..., dict[str, str]]
ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")
REFUND_TIMELINE = [
    "thread.launched", "message.received",
    "tool.call", "tool.started", "tool.result",  # lookup_order
    "tool.call", "approval.requested", "approval.decided", "tool.started", "tool.result",  # issue_refund
    "reply",
]  # fmt: skip


# -- running the command -----------------------------------------------------------------------------------------


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, flags: Sequence[str] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m bot.cli ARGS`` from the project root; killed (and reaped) if it outlives ``timeout``."""
    return subprocess.run(
        [python(), *flags, "-m", "bot.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


async def handrail(env: dict[str, str], *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The same, off the event loop, so the test's in-process worker keeps running meanwhile."""
    return await asyncio.to_thread(run_cli, env, *args, **kwargs)


def succeeded(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def failed_cleanly(r: subprocess.CompletedProcess[str], message: str) -> None:
    """A non-zero exit with ``message`` on stderr and no traceback anywhere."""
    assert r.returncode != 0, f"expected a failure, got exit 0\nstdout:\n{r.stdout}"
    assert message in r.stderr, f"{message!r} not in stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


def in_order(text: str, *parts: str) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} missing (or out of order) after position {at} in:\n{text}"
        at = found + len(part)


def chat_thread(output: str) -> str:
    found = re.search(r"^Chatting with \S+ as \S+ \(thread (\w+)\)", output, re.M)
    assert found, output
    return found.group(1)


def timeline_types(output: str) -> list[str]:
    """The event type column of `threads show` (lines that start with the event's clock time)."""
    return [ln.split()[1] for ln in output.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", ln)]


async def ledger(deps: Deps) -> dict[bytes, bytes]:
    return dict(await deps.redis.hgetall(f"{deps.keys.ns}:refunds"))


async def pending_refund(deps: Deps, env: dict[str, str], text: str = "refund A100 25") -> tuple[str, str]:
    """Start a refund with `threads launch` and wait for its approval request: (thread id, approval id)."""
    out = succeeded(await handrail(env, "threads", "launch", text, "--agent", "refund-desk", "--as", "terminal:alice"))
    tid = out.strip()
    thread = await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    return tid, request.approval_id


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`handrail worker` in its own process; stopped with SIGTERM (as a service manager would) at the end."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [python(), "-m", "bot.cli", "worker"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


# -- help ----------------------------------------------------------------------------------------------------------


def test_help_lists_the_commands_and_a_subcommand_help_describes_its_verbs(env_for: Env) -> None:
    env = env_for()
    top = succeeded(run_cli(env, "--help"))
    assert top.startswith("Usage: ")
    for command, described in [
        ("chat", "Talk to an agent in the terminal"),
        ("threads", "List, show, launch, pause, resume and cancel threads."),
        ("approvals", "List and decide pending approvals."),
        ("dlq", "Entries that failed again and again"),
        ("worker", "Run one agent worker"),
        ("up", "Run everything in one process"),
    ]:
        assert re.search(rf"^\s+{command}\s+{re.escape(described)}", top, re.M), f"{command} not described:\n{top}"

    verbs = succeeded(run_cli(env, "approvals", "-h"))
    for verb in ("list", "approve", "reject"):
        assert re.search(rf"^\s+{verb}\s+\S", verbs, re.M), verbs
    approve = succeeded(run_cli(env, "approvals", "approve", "--help"))
    assert "Usage: python -m bot.cli approvals approve [OPTIONS] APPROVAL_ID" in approve
    assert "--as terminal:NAME" in approve and "--args TEXT" in approve and "Approve a pending tool call" in approve

    unknown = run_cli(env, "frobnicate")
    assert unknown.returncode == 2 and "No such command 'frobnicate'" in unknown.stderr


# -- chat ----------------------------------------------------------------------------------------------------------


async def test_chat_shows_the_approval_card_then_the_approval_then_the_reply(
    deps: Deps, env_for: Env, tmp_path: Path
) -> None:
    env = env_for()
    lease_keys = [deps.keys.lease(p) for p in range(deps.keys.partitions)]
    with worker_process(env, tmp_path / "worker.log") as worker:
        for _ in range(600):  # the worker imports litellm before taking partitions
            if await deps.redis.exists(*lease_keys) == len(lease_keys) or worker.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert await deps.redis.exists(*lease_keys) == len(lease_keys), (tmp_path / "worker.log").read_text()

        r = await handrail(env, "chat", "--as", "terminal:alice", stdin="refund A100 25\ny\n")
        out = succeeded(r)
        tid = chat_thread(out)
        events = (await threads.get(deps.redis, deps.keys, tid)).events
        [approval_id] = [e.approval_id for e in events if isinstance(e, ApprovalRequested)]
        in_order(
            out,
            "refund-desk wants to run issue_refund:",
            "order_id: A100",
            "amount_cents: 2500",
            f"approvers: terminal:alice, api:ops   [approval {approval_id}]",
            "✔ Approved by terminal:alice",
            f"refund-desk: Refunded $25.00 on order A100 (R-{approval_id[-6:]}).",
        )
        assert out.count("wants to run") == 1 and out.count("refund-desk: Refunded") == 1

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, (tmp_path / "worker.log").read_text()
    assert await deps.redis.exists(*lease_keys) == 0, "a worker stopped with SIGTERM releases its partitions"
    thread = await threads.get(deps.redis, deps.keys, tid)
    assert [e.type for e in thread.events] == REFUND_TIMELINE
    assert list((await ledger(deps)).values()) == [f"A100:2500:R-{approval_id[-6:]}".encode()]
    groups = [g["name"].decode() for g in await deps.redis.xinfo_groups(deps.keys.outbox("terminal"))]
    assert f"chat:{tid}" not in groups, "the chat session removes its consumer group when it ends"


async def test_chat_on_a_thread_waiting_for_approval_shows_its_card_and_takes_the_decision(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    await start_worker()
    tid, approval_id = await pending_refund(deps, env)
    out = succeeded(await handrail(env, "chat", "--thread", tid, "--as", "terminal:alice", stdin="y\n"))
    in_order(
        out,
        "approval requested for issue_refund",  # the timeline so far
        "refund-desk wants to run issue_refund:",  # then the card it is waiting on
        "order_id: A100",
        "amount_cents: 2500",
        f"approvers: terminal:alice, api:ops   [approval {approval_id}]",
        "approve: y    reject: n <reason>",
        f"Chatting with refund-desk as terminal:alice (thread {tid})",
        "✔ Approved by terminal:alice",
        "refund-desk: Refunded $25.00 on order A100",
    )
    await wait_for(deps, tid, status_is(Status.DONE))


def test_ctrl_c_ends_a_chat_at_once_while_it_waits_for_a_line(env_for: Env) -> None:
    proc = subprocess.Popen(
        [python(), "-m", "bot.cli", "chat", "--as", "terminal:alice"], cwd=ROOT, env=env_for(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("Chatting with refund-desk"), "the chat did not start"
        time.sleep(0.2)  # into the read of the first line
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        took = time.monotonic() - interrupted
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert code == 130 and "Traceback" not in stderr and "Aborted" not in stderr, (code, stderr)
    assert took < 2, f"Ctrl-C took {took:.1f} s to end the chat (stdin is still open: no Enter came)"


async def test_chat_rejection_with_a_reason_reaches_the_agent_which_says_so(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    await start_worker()
    out = succeeded(await handrail(env_for(), "chat", "--as", "terminal:alice", stdin="refund A101\nn too late\n"))
    in_order(
        out,
        "refund-desk wants to run issue_refund:",
        "order_id: A101",
        "amount_cents: 1900",
        "✘ Rejected by terminal:alice: too late",
        "refund-desk: OK, I did not refund it. terminal:alice rejected the refund: too late",
    )
    thread = await threads.get(deps.redis, deps.keys, chat_thread(out))
    assert thread.status is Status.DONE and "tool.started" not in [e.type for e in thread.events[5:]]
    assert await ledger(deps) == {}


async def test_chat_never_imports_litellm(deps: Deps, env_for: Env, start_worker: Any) -> None:
    # The whole session runs (config with LLM agents loaded, an approval decided, the reply shown) and
    # -X importtime lists every module the process imported: litellm must not be one of them.
    await start_worker()
    r = await handrail(
        env_for(), "chat", "--as", "terminal:alice", stdin="refund A102 10\ny\n", flags=["-X", "importtime"]
    )
    out = succeeded(r)
    assert "refund-desk: Refunded $10.00 on order A102" in out
    assert re.search(r"\|\s+channels\.terminal$", r.stderr, re.M), "importtime output is missing"
    assert re.search(r"\|\s+bot\.llm$", r.stderr, re.M), "bot.llm (litellm's wrapper) was imported, lazily"
    litellm = [ln for ln in r.stderr.splitlines() if re.search(r"\|\s+litellm(\.|$)", ln)]
    assert litellm == [], "chat imported litellm:\n" + "\n".join(litellm[:5])


async def test_a_non_approver_answering_y_in_chat_is_refused_and_nothing_runs(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    await start_worker()
    out = succeeded(await handrail(env_for(), "chat", "--as", "terminal:mallory", stdin="refund A100 25\ny\n"))
    in_order(out, "wants to run issue_refund:", "amount_cents: 2500", "! you are not allowed to decide this approval")
    assert "Approved by" not in out and "Refunded" not in out
    await asyncio.sleep(0.3)
    thread = await threads.get(deps.redis, deps.keys, chat_thread(out))
    assert thread.status is Status.WAITING_APPROVAL
    request = thread.open_approval()
    assert request is not None
    assert (await approvals.get(deps.redis, deps.keys, request.approval_id)).state == "pending"
    assert await ledger(deps) == {}


# -- threads -------------------------------------------------------------------------------------------------------


async def test_threads_list_shows_each_thread_with_its_status_and_show_prints_the_timeline(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    await start_worker()
    done = chat_thread(succeeded(await handrail(env, "chat", "--as", "terminal:alice", stdin="refund A100 25\ny\n")))
    waiting, _ = await pending_refund(deps, env, "refund A101")

    listed = succeeded(await handrail(env, "threads", "list"))
    rows = {ln.split()[0]: ln.split()[1:4] for ln in listed.splitlines()}
    assert rows == {
        done: ["refund-desk", "done", str(len(REFUND_TIMELINE))],
        waiting: ["refund-desk", "waiting_approval", "7"],
    }
    assert listed.splitlines()[0].startswith(waiting), "most recently active first"
    only_done = succeeded(await handrail(env, "threads", "list", "--status", "done"))
    assert [ln.split()[0] for ln in only_done.splitlines()] == [done]

    shown = succeeded(await handrail(env, "threads", "show", done))
    assert shown.splitlines()[0] == f"thread {done}  agent refund-desk  status done"
    assert timeline_types(shown) == REFUND_TIMELINE
    in_order(
        shown,
        "terminal:alice: refund A100 25",
        'call lookup_order({"order_id": "A100"})',
        'call issue_refund({"amount_cents": 2500, "order_id": "A100"})',
        "approval requested for issue_refund",
        "approved by terminal:alice",
        "reply: Refunded $25.00 on order A100",
    )
    assert "prompt (" not in shown, "a deterministic agent has no prompts"


async def test_threads_show_prints_the_verified_prompt_of_an_llm_step(
    deps: Deps, env_for: Env, start_worker: Any, model: ScriptedModel, tmp_path: Path
) -> None:
    model.add(call("reply", {"text": "hi"}))
    await start_worker()
    accepted = await control.launch(deps, "support", "hello there", ALICE)
    await wait_for(deps, accepted.thread_id, status_is(Status.DONE), timeout=30)
    sent = model.requests[0]["messages"]
    printed = "\n".join(f"      [{m['role']}]\n        " + str(m["content"]).replace("\n", "\n        ") for m in sent)

    shown = succeeded(await handrail(env_for(), "threads", "show", accepted.thread_id))
    assert timeline_types(shown) == [  # the pre-fetched refund policy, then the model's one step
        "thread.launched", "message.received", "tool.call", "tool.started", "tool.result", "reply"
    ]  # fmt: skip
    reply = next(ln for ln in shown.splitlines() if " reply " in ln)
    assert reply.endswith("]") and "reply: hi  [openai/gpt-4o-mini, " in reply
    assert shown.count("prompt (") == 1, "only the model step has a prompt"
    in_order(shown, "reply: hi", "    prompt (verified: identical to what was sent):\n" + printed)
    assert "text: hello there" in printed

    quiet = succeeded(await handrail(env_for(), "threads", "show", accepted.thread_id, "--no-prompts"))
    assert "prompt (" not in quiet and "reply: hi" in quiet

    # the template changed since: the re-rendered prompt is no longer what was sent, and show says so
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "support.md").write_text((ROOT / "prompts" / "support.md").read_text() + "\nBe terse.\n")
    env = env_for() | {"HANDRAIL_PROMPTS": str(prompts)}  # env_for's extras cannot override its own keys
    changed = succeeded(await handrail(env, "threads", "show", accepted.thread_id))
    assert "prompt (NOT identical (template changed)):" in changed and "verified" not in changed


async def test_threads_pause_resume_and_cancel_move_the_thread(deps: Deps, env_for: Env, start_worker: Any) -> None:
    env = env_for()
    await start_worker()
    tid, _ = await pending_refund(deps, env)

    assert succeeded(await handrail(env, "threads", "pause", tid, "--as", "terminal:alice")) == f"pause: {tid}\n"
    await wait_for(deps, tid, status_is(Status.PAUSED))
    assert succeeded(await handrail(env, "threads", "resume", tid, "--as", "terminal:alice")) == f"resume: {tid}\n"
    await wait_for(deps, tid, status_is(Status.WAITING_APPROVAL))
    assert succeeded(await handrail(env, "threads", "cancel", tid, "--as", "terminal:bob")) == f"cancel: {tid}\n"
    thread = await wait_for(deps, tid, status_is(Status.CANCELLED))
    assert [e.type for e in thread.events][-3:] == ["thread.paused", "thread.resumed", "thread.cancelled"]
    assert [getattr(e, "by", None) for e in thread.events[-3:]] == ["terminal:alice", "terminal:alice", "terminal:bob"]
    listed = succeeded(await handrail(env, "threads", "list"))
    assert listed.split()[:3] == [tid, "refund-desk", "cancelled"]


async def test_an_unknown_thread_is_a_clean_error_for_every_thread_command(deps: Deps, env_for: Env) -> None:
    env = env_for()
    commands = [
        ["threads", "show", "nope"],
        ["threads", "pause", "nope"],
        ["threads", "resume", "nope"],
        ["threads", "cancel", "nope"],
        ["chat", "--thread", "nope"],
    ]
    results = await asyncio.gather(*(handrail(env, *c) for c in commands))
    for command, r in zip(commands, results, strict=True):
        assert r.returncode == 1, (command, r.stderr)
        failed_cleanly(r, "Error: no thread 'nope' (see 'handrail threads list')")
    assert await deps.redis.xlen(deps.keys.inbound_for("nope")) == 0, "nothing was published for a missing thread"


# -- approvals -----------------------------------------------------------------------------------------------------


async def test_approvals_list_then_approve_and_a_second_approve_is_refused(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    await start_worker()
    tid, approval_id = await pending_refund(deps, env)

    listed = succeeded(await handrail(env, "approvals", "list"))
    assert len(listed.splitlines()) == 1
    assert listed.split()[:3] == [approval_id, "thread", tid]
    assert (
        'issue_refund({"amount_cents": 2500, "order_id": "A100"})  approvers: terminal:alice, api:ops  since ' in listed
    )

    assert succeeded(await handrail(env, "approvals", "approve", approval_id, "--as", "terminal:alice")) == (
        "approved by terminal:alice\n"
    )
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert isinstance(thread.events[-1], Reply) and thread.events[-1].text.startswith("Refunded $25.00 on order A100")
    assert len(await ledger(deps)) == 1

    again = await handrail(env, "approvals", "approve", approval_id, "--as", "terminal:alice")
    failed_cleanly(again, "already approved by terminal:alice at ")
    assert succeeded(await handrail(env, "approvals", "list")) == "no pending approvals\n"
    await asyncio.sleep(0.2)
    assert len(await ledger(deps)) == 1, "the refund ran once"
    failed_cleanly(await handrail(env, "approvals", "approve", "nope", "--as", "terminal:alice"), "no such approval")


async def test_approvals_reject_sends_the_reason_and_a_non_approver_is_refused(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    await start_worker()
    tid, approval_id = await pending_refund(deps, env)

    refused = await handrail(env, "approvals", "approve", approval_id, "--as", "terminal:mallory")
    failed_cleanly(refused, "Error: you are not allowed to decide this approval")
    assert (await approvals.get(deps.redis, deps.keys, approval_id)).state == "pending"
    refused = await handrail(env, "approvals", "reject", approval_id, "--reason", "why not", "--as", "terminal:bob")
    failed_cleanly(refused, "not allowed")

    rejected = await handrail(
        env, "approvals", "reject", approval_id, "--reason", "order already refunded", "--as", "terminal:alice"
    )
    assert succeeded(rejected) == "rejected by terminal:alice\n"
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    said = "OK, I did not refund it. terminal:alice rejected the refund: order already refunded"
    assert thread.events[-1].text == said  # type: ignore[union-attr]
    assert await ledger(deps) == {}
    missing_reason = await handrail(env, "approvals", "reject", approval_id, "--as", "terminal:alice")
    assert missing_reason.returncode == 2 and "Missing option '--reason'" in missing_reason.stderr


async def test_approve_with_edited_args_runs_the_edited_call_and_bad_args_are_refused(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    await start_worker()
    tid, approval_id = await pending_refund(deps, env)
    approve = ["approvals", "approve", approval_id, "--as", "terminal:alice", "--args"]

    not_json = await handrail(env, *approve, "{order_id: A100")
    assert not_json.returncode == 2 and "Invalid value for --args: not JSON" in not_json.stderr
    not_object = await handrail(env, *approve, "[1, 2]")
    assert not_object.returncode == 2 and "must be a JSON object" in not_object.stderr
    invalid = await handrail(env, *approve, json.dumps({"order_id": "A100", "amount_cents": -5}))
    failed_cleanly(invalid, "edited arguments for issue_refund are invalid")
    assert (await approvals.get(deps.redis, deps.keys, approval_id)).state == "pending"

    edited = await handrail(env, *approve, json.dumps({"order_id": "A100", "amount_cents": 1000}))
    assert succeeded(edited) == "approved by terminal:alice\n"
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert thread.events[-1].text.startswith("Refunded $10.00 on order A100")  # type: ignore[union-attr]
    assert [v.split(b":")[1] for v in (await ledger(deps)).values()] == [b"1000"]


@pytest.mark.parametrize("identity", ["api:ops", "slack:UALICE", "email:alice@example.org", "terminal:", "alice"])
async def test_as_takes_only_a_terminal_identity_and_a_refusal_decides_nothing(
    deps: Deps, env_for: Env, start_worker: Any, identity: str
) -> None:
    env = env_for()
    await start_worker()
    tid, approval_id = await pending_refund(deps, env)
    commands = [
        ["approvals", "approve", approval_id, "--as", identity],
        ["approvals", "reject", approval_id, "--reason", "no", "--as", identity],
        ["threads", "cancel", tid, "--as", identity],
        ["threads", "launch", "hi", "--agent", "refund-desk", "--as", identity],
        ["chat", "--as", identity],
    ]
    for r in await asyncio.gather(*(handrail(env, *c, stdin="hi\n") for c in commands)):
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert f"Invalid value for '--as': {identity!r}: the command line acts only as a terminal user" in r.stderr
    assert (await approvals.get(deps.redis, deps.keys, approval_id)).state == "pending"
    assert (await threads.get(deps.redis, deps.keys, tid)).status is Status.WAITING_APPROVAL
    assert len(await control.list_threads(deps)) == 1, "nothing was launched"


# -- dead letters --------------------------------------------------------------------------------------------------


async def test_dlq_lists_a_dead_letter_with_its_error_and_retry_lets_the_thread_complete(
    deps: Deps, env_for: Env, start_worker: Any
) -> None:
    env = env_for()
    assert succeeded(await handrail(env, "dlq", "list")) == "no dead letters\n"
    await start_worker()
    FAIL["on"] = True
    try:
        accepted = await control.launch(deps, "flaky", "hello", ALICE)
        for _ in range(200):  # three attempts with back-off, then the dead-letter stream
            if await deps.redis.xlen(deps.keys.dlq):
                break
            await asyncio.sleep(0.05)
    finally:
        FAIL["on"] = False
    [(dlq_id, _)] = await deps.bus.dead_letters()
    tid = accepted.thread_id
    assert [e.type for e in (await threads.get(deps.redis, deps.keys, tid)).events] == ["thread.launched"]

    listed = succeeded(await handrail(env, "dlq", "list"))
    assert listed == (
        f"{dlq_id}  from {deps.keys.inbound_for(tid)}: RuntimeError: the flaky agent is failing on purpose\n"
    )

    retried = succeeded(await handrail(env, "dlq", "retry", dlq_id))
    assert re.fullmatch(rf"retried {re.escape(dlq_id)} as \d+-\d+\n", retried), retried
    thread = await wait_for(deps, tid, status_is(Status.DONE))
    assert [e.type for e in thread.events] == ["thread.launched", "message.received", "reply"]
    assert thread.events[-1].text == "fine now"  # type: ignore[union-attr]
    assert succeeded(await handrail(env, "dlq", "list")) == "no dead letters\n"
    failed_cleanly(await handrail(env, "dlq", "retry", dlq_id), f"no dead letter {dlq_id}")


async def test_dlq_retry_of_a_malformed_id_is_a_clean_error(deps: Deps, env_for: Env) -> None:
    # A typo in the id must read like an unknown id does, not end in Redis's traceback.
    failed_cleanly(await handrail(env_for(), "dlq", "retry", "not-an-id"), "no dead letter not-an-id")


# -- configuration -------------------------------------------------------------------------------------------------

CONFIG_LOADING_COMMANDS = [
    ["threads", "list"],
    ["threads", "show", "t1"],
    ["threads", "launch", "hi", "--agent", "x"],
    ["approvals", "approve", "a1", "--as", "terminal:alice"],
    ["chat", "--as", "terminal:alice"],
    ["worker"],
]


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("agents: {x: {step: nope}}", "agents.x.step"),
        ("agents: {x: {step: 'agents.refunds:refund_desk', stepp: 1}}", "agents.x.stepp"),
        ("agents: {x: {step: 'agents.refunds:refund_desk', tools: ['agents.refunds:nope']}}", "agents.x.tools[0]"),
        ("agents: {x: {step: 'agents.refunds:refund_desk'}}\nroutes: {terminal: y}", "routes.terminal"),
    ],
    ids=["bad-import-path", "unknown-key", "missing-tool", "route-to-nowhere"],
)
def test_a_bad_config_stops_every_command_with_the_file_and_the_key(
    env_for: Env, tmp_path: Path, yaml_text: str, key: str
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(yaml_text + "\n")
    env = env_for() | {"HANDRAIL_CONFIG": str(config)}  # env_for's extras cannot override its own keys
    with ThreadPoolExecutor(len(CONFIG_LOADING_COMMANDS)) as pool:
        results = list(pool.map(lambda c: run_cli(env, *c, stdin="hello\n"), CONFIG_LOADING_COMMANDS))
    for command, r in zip(CONFIG_LOADING_COMMANDS, results, strict=True):
        assert r.returncode == 1, (command, r.returncode, r.stderr)
        failed_cleanly(r, f"Error: {config}: {key}: ")
        assert r.stdout == "", (command, r.stdout)
