"""Webhooks over real HTTP: signed deliveries to local receivers, and signed inbound triggers served by uvicorn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from bot import control, threads
from bot.config import Config
from bot.errors import ConfigError
from bot.events import ChannelRef, MessageReceived, Reply
from bot.runtime import Deps
from bot.settings import Settings
from bot.threads import Status, Thread
from channels.webhooks import BadSecret, SignatureError, deliver_all, sign, verify, webhook, webhook_stream
from tests.conftest import status_is, wait_for, web_client

SECRET = "whsec_" + base64.b64encode(b"subscribers-in-this-test-0123").decode()
TRIGGER_SECRET = "whsec_" + base64.b64encode(b"trigger-secret-in-this-test").decode()
OTHER = "whsec_" + base64.b64encode(b"not-the-secret-at-all-0123").decode()
ALICE = ChannelRef(kind="terminal", address="t", user="terminal:alice")
THREE = ["approval.requested", "approval.decided", "thread.done"]


# -- a webhook receiver ------------------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]  # names lowercased
    body: bytes
    at: float  # time.monotonic()

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def event(self) -> str:
        return self.headers["handrail-event"]

    @property
    def delivery(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records each request and answers from a script, then ``default``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: deque[tuple[int, dict[str, str], float]] = deque()
        self.default: tuple[int, dict[str, str], float] = (200, {}, 0.0)  # status, headers, delay before answering
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(headers, body, time.monotonic()))
                status, extra, delay = receiver.script.popleft() if receiver.script else receiver.default
                time.sleep(delay)
                with contextlib.suppress(OSError):  # the sender may have stopped waiting
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/events"

    def answer(self, status: int, *, times: int = 1, headers: dict[str, str] | None = None) -> None:
        self.script.extend([(status, headers or {}, 0.0)] * times)

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} requests, not {n}: {[r.event for r in self.requests]}")
            await asyncio.sleep(0.02)
        return list(self.requests)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receivers(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Receiver, Receiver]]:
    """The test config's two subscribers, ``audit`` and ``pager``, each at its own receiver."""
    audit, pager = Receiver(), Receiver()
    monkeypatch.setenv("TEST_WEBHOOK_URL", audit.url)
    monkeypatch.setenv("TEST_PAGER_URL", pager.url)
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("TEST_TRIGGER_SECRET", TRIGGER_SECRET)
    yield audit, pager
    audit.stop()
    pager.stop()


@pytest.fixture
def settings(settings: Settings, receivers: tuple[Receiver, Receiver]) -> Settings:
    """The config is read when ``deps`` opens, so the receivers' addresses must be in the environment first."""
    return settings


@pytest.fixture
async def deliver(deps: Deps) -> AsyncIterator[Callable[..., None]]:
    """Start ``deliver_all`` tasks (quick backoff unless told otherwise); stopped when the test ends."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(**options: Any) -> None:
        tasks.append(asyncio.create_task(deliver_all(deps, stop, **{"base_delay": 0.05, **options})))

    yield start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def pending_refund(deps: Deps) -> tuple[str, str]:
    accepted = await control.launch(deps, "refund-desk", "refund A100 25", ALICE)
    thread = await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))
    request = thread.open_approval()
    assert request is not None
    return accepted.thread_id, request.approval_id


async def refunded(deps: Deps) -> Thread:
    """A refund-desk thread run to the end: its three webhook events are queued."""
    tid, approval_id = await pending_refund(deps)
    assert (await control.decide(deps, approval_id, by="terminal:alice", approved=True)).result == "ok"
    return await wait_for(deps, tid, status_is(Status.DONE))


# -- signing -----------------------------------------------------------------------------------------------------

NOW = int(time.time())
BODY = b'{"type":"thread.done","thread_id":"t1"}'
S3 = "whsec_" + base64.b64encode(b"s3cret-s3cret-s3cret-s3cret").decode()
GOOD = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": sign(S3, "msg_1", NOW, BODY)}


@pytest.fixture(autouse=True)
def _signed_just_now(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signing tests' headers were made at import; the library's clock reads that moment, however long the
    suite took to get here."""
    if request.node.name.startswith(("test_the_signature", "test_verify_refuses")):
        import standardwebhooks.webhooks as lib

        frozen = datetime.fromtimestamp(NOW, tz=UTC)
        monkeypatch.setattr(lib, "datetime", type("Frozen", (datetime,), {"now": staticmethod(lambda tz=None: frozen)}))


def test_the_signature_is_standard_webhooks_over_id_timestamp_and_body() -> None:
    mac = hmac.new(b"s3cret-s3cret-s3cret-s3cret", f"msg_1.{NOW}.".encode() + BODY, hashlib.sha256).digest()
    assert GOOD["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    verify(S3, GOOD, BODY)
    verify(S3, {k.upper(): v for k, v in GOOD.items()}, BODY)  # header names in any case
    rotated = {**GOOD, "webhook-signature": f"v1,{base64.b64encode(b'0' * 32).decode()} {GOOD['webhook-signature']}"}
    verify(S3, rotated, BODY)  # a sender rotating secrets signs with both


@pytest.mark.parametrize(
    ("secret", "headers", "body", "reason"),
    [
        (S3, GOOD, BODY.replace(b"t1", b"t2"), "No matching signature"),  # tampered body
        (OTHER, GOOD, BODY, "No matching signature"),  # wrong secret
        (S3, {**GOOD, "webhook-id": "msg_2"}, BODY, "No matching signature"),  # a replay under a new id
        (S3, {**GOOD, "webhook-timestamp": str(NOW + 60)}, BODY, "No matching signature"),  # restamped
        (S3, {**GOOD, "webhook-timestamp": str(NOW - 301)}, BODY, "too old"),  # stale: a replay
        (S3, {**GOOD, "webhook-timestamp": str(NOW + 301)}, BODY, "too new"),  # from the future
        (S3, {k: v for k, v in GOOD.items() if k != "webhook-signature"}, BODY, "Missing required headers"),
        (S3, {k: v for k, v in GOOD.items() if k != "webhook-id"}, BODY, "Missing required headers"),
        (S3, {**GOOD, "webhook-timestamp": "yesterday"}, BODY, "Invalid Signature Headers"),
        (S3, {**GOOD, "webhook-signature": "v1=abc"}, BODY, "malformed webhook-signature"),
        (S3, GOOD, b"\xff" + BODY, "not UTF-8"),
    ],
    ids=["tampered", "wrong-secret", "new-id", "restamped", "stale", "future", "no-signature", "no-id",
         "bad-timestamp", "malformed", "not-utf8"],
)  # fmt: skip
def test_verify_refuses(secret: str, headers: dict[str, str], body: bytes, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify(secret, headers, body)


@pytest.mark.parametrize("secret", ["s3cret", "whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode()])
def test_a_secret_not_in_whsec_form_is_refused_without_showing_it(secret: str) -> None:
    with pytest.raises(BadSecret) as caught:
        webhook(secret)
    assert secret.removeprefix("whsec_") not in str(caught.value)


# -- outbound ----------------------------------------------------------------------------------------------------


async def test_a_refund_thread_reaches_its_subscribers_signed_and_in_order(
    deps: Deps, start_worker: Any, deliver: Callable[..., None], receivers: tuple[Receiver, Receiver]
) -> None:
    audit, pager = receivers
    await start_worker()
    deliver()
    tid, approval_id = await pending_refund(deps)
    [first] = await audit.wait_for(1)
    assert first.event == "approval.requested", "delivered as it happens, not at the end"
    await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    thread = await wait_for(deps, tid, status_is(Status.DONE))

    got = await audit.wait_for(3)
    ids: dict[str, str] = {e.type: e.id for e in thread.events}
    for r, kind, source in zip(got, THREE, ["approval.requested", "approval.decided", "reply"], strict=True):
        verify(SECRET, r.headers, r.body)
        with pytest.raises(SignatureError):
            verify(OTHER, r.headers, r.body)
        body = r.json
        assert (r.event, r.headers["content-type"]) == (kind, "application/json")
        assert (body["type"], body["thread_id"], body["agent"]) == (kind, tid, "refund-desk")
        assert r.delivery == body["id"] == body["event"]["id"] == ids[source]
        assert (body["event"]["type"], body["event"]["thread_id"]) == (source, tid)
    assert got[0].json["event"]["args"] == {"order_id": "A100", "amount_cents": 2500}
    assert got[1].json["event"]["by"] == "terminal:alice"
    # pager asked for other events; decisions are not among them
    assert [r.event for r in await pager.wait_for(2)] == ["approval.requested", "thread.done"]
    await asyncio.sleep(0.3)
    assert (len(audit.requests), len(pager.requests)) == (3, 2), "each event once"
    assert await deps.redis.xlen(deps.keys.outbox(webhook_stream("audit"))) == 0, "delivered entries are removed"


async def test_a_failed_delivery_is_retried_with_the_same_delivery_id_and_order_is_kept(
    deps: Deps, start_worker: Any, deliver: Callable[..., None], receivers: tuple[Receiver, Receiver]
) -> None:
    audit, _ = receivers
    audit.answer(500, times=2)
    await start_worker()
    await refunded(deps)
    deliver()  # all three events are queued before the first attempt: the later two wait their turn
    got = await audit.wait_for(5)
    assert [r.event for r in got] == ["approval.requested"] * 3 + THREE[1:]
    assert len({r.delivery for r in got[:3]}) == 1 and len({r.delivery for r in got}) == 3
    for r in got:
        verify(SECRET, r.headers, r.body)
    await asyncio.sleep(0.3)
    assert len(audit.requests) == 5
    assert await deps.bus.dead_letters() == []


async def test_retry_after_from_a_429_is_honoured(
    deps: Deps, start_worker: Any, deliver: Callable[..., None], receivers: tuple[Receiver, Receiver]
) -> None:
    audit, _ = receivers
    audit.answer(429, headers={"Retry-After": "1"})
    await start_worker()
    deliver(base_delay=0.01)
    await pending_refund(deps)
    first, second = await audit.wait_for(2)
    assert second.delivery == first.delivery
    assert second.at - first.at >= 0.9, "waited as long as the receiver asked, not the 0.01 s backoff"


async def test_a_dead_subscriber_delays_no_one_else_and_ends_in_the_dead_letters(
    deps: Deps,
    start_worker: Any,
    deliver: Callable[..., None],
    receivers: tuple[Receiver, Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    audit, pager = receivers
    pager.default = (500, {}, 1.0)  # hangs past the client's timeout, every time
    await start_worker()
    deliver(max_attempts=4, timeout=0.3)  # about 1.5 s per pager event before it is dead-lettered
    tid, approval_id = await pending_refund(deps)
    await audit.wait_for(1, timeout=1.0)
    await control.decide(deps, approval_id, by="terminal:alice", approved=True)
    await wait_for(deps, tid, status_is(Status.DONE))
    assert [r.event for r in await audit.wait_for(3, timeout=1.0)] == THREE
    assert len(await deps.bus.dead_letters()) < 2, "audit was served while pager was still being retried"

    for _ in range(200):
        if len(letters := await deps.bus.dead_letters()) >= 2:
            break
        await asyncio.sleep(0.05)
    assert [f["stream"] for _, f in letters] == [deps.keys.outbox(webhook_stream("pager"))] * 2
    assert {f["error"] for _, f in letters} == {"DeliveryFailed: webhook pager: no answer within 0.3 s"}
    assert [json.loads(f["payload"])["event"]["type"] for _, f in letters] == ["approval.requested", "thread.done"]
    assert [r.event for r in pager.requests] == ["approval.requested"] * 4 + ["thread.done"] * 4
    assert SECRET not in caplog.text and all(SECRET not in json.dumps(f) for _, f in letters)


async def test_an_event_a_subscriber_refuses_for_good_is_dead_lettered_at_once_and_the_rest_go_out(
    deps: Deps, start_worker: Any, deliver: Callable[..., None], receivers: tuple[Receiver, Receiver]
) -> None:
    audit, _ = receivers
    audit.answer(400)  # e.g. the subscriber's schema rejects this payload: no retry will change that
    await start_worker()
    await refunded(deps)
    t0 = time.monotonic()
    deliver(base_delay=5.0)  # a retry would take 5 s: everything arriving within a second means none happened
    got = await audit.wait_for(3, timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    assert [r.event for r in got] == THREE, "the refused event was tried once, the others went out after it"
    [(_, letter)] = await deps.bus.dead_letters()
    assert letter["error"] == "PermanentDeliveryError: webhook audit answered HTTP 400"
    assert json.loads(letter["payload"])["event"]["type"] == "approval.requested"
    await asyncio.sleep(0.3)
    assert len(audit.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_a_4xx_is_refused_for_good(status: int) -> None:
    from channels.webhooks import refused_for_good

    assert refused_for_good(status)


@pytest.mark.parametrize("status", [302, 408, 409, 425, 429, 500, 502, 503])
def test_a_5xx_or_a_come_back_later_4xx_is_retried(status: int) -> None:
    from channels.webhooks import refused_for_good

    assert not refused_for_good(status)


async def test_two_deliverers_send_each_event_once_and_in_order(
    deps: Deps, start_worker: Any, deliver: Callable[..., None], receivers: tuple[Receiver, Receiver]
) -> None:
    audit, _ = receivers
    await start_worker()
    deliver()
    deliver()  # as with two `handrail worker` processes: one holds the subscriber's lease
    await refunded(deps)
    assert [r.event for r in await audit.wait_for(3)] == THREE
    await asyncio.sleep(0.3)
    assert len(audit.requests) == 3


async def test_a_subscriber_without_its_secret_stops_start_up(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_WEBHOOK_SECRET")
    with pytest.raises(ConfigError) as err:
        await deliver_all(deps, asyncio.Event())
    assert str(err.value) == (
        "environment: TEST_WEBHOOK_SECRET: not set; webhook subscriber 'audit' signs its requests with it"
    )


async def test_without_subscribers_it_waits_for_stop(deps: Deps) -> None:
    spec = deps.agents.spec.model_copy(update={"webhooks": {}})
    bare = replace(deps, config=Config(deps.agents.path, spec, deps.agents.agents))
    stop = asyncio.Event()
    task = asyncio.create_task(deliver_all(bare, stop))
    await asyncio.sleep(0.1)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 1)


# -- inbound triggers --------------------------------------------------------------------------------------------


@pytest.fixture
async def client(deps: Deps) -> AsyncIterator[httpx.AsyncClient]:
    """The web app under uvicorn on a free port, and an HTTP client for it."""
    async with web_client(deps) as c:
        yield c


def signed(
    payload: Any = None, *, raw: bytes | None = None, secret: str = TRIGGER_SECRET, delivery: str = "", at: int = 0
) -> dict[str, Any]:
    """httpx keyword arguments for a POST signed as Standard Webhooks (a fresh id unless ``delivery`` is given)."""
    body = raw if raw is not None else json.dumps(payload).encode()
    stamp = at or int(time.time())
    msg_id = delivery or f"msg_{uuid.uuid4().hex}"
    headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(stamp),
               "webhook-signature": sign(secret, msg_id, stamp, body)}  # fmt: skip
    return {"content": body, "headers": headers}


def replies(n: int) -> Callable[[Thread], bool]:
    return lambda t: sum(isinstance(e, Reply) for e in t.events) == n


async def test_a_signed_trigger_launches_a_thread_and_its_key_continues_it(
    deps: Deps, start_worker: Any, client: httpx.AsyncClient
) -> None:
    await start_worker()
    first = {"order": {"id": "A100"}, "note": "first"}
    r = await client.post("/hooks/orders", **signed(first, delivery="dlv-1"))
    assert (r.status_code, r.json()) == (202, {"thread_id": "hook-orders-A100", "duplicate": False})
    thread = await wait_for(deps, "hook-orders-A100", replies(1))
    assert thread.agent == "refund-desk" and thread.status is Status.DONE, "the worker ran it"

    again = await client.post("/hooks/orders", **signed(first, delivery="dlv-1"))  # a sender's retry
    assert (again.status_code, again.json()) == (202, {"thread_id": "hook-orders-A100", "duplicate": True})
    # the same id with another thread key: a duplicate of the first delivery, and no second thread anywhere
    reused = await client.post("/hooks/orders", **signed({"order": {"id": "Z9"}}, delivery="dlv-1"))
    assert reused.json() == {"thread_id": "hook-orders-A100", "duplicate": True}
    second = await client.post("/hooks/orders", **signed({"order": {"id": "A100"}, "note": "second"}, delivery="d2"))
    assert second.json() == {"thread_id": "hook-orders-A100", "duplicate": False}
    other = await client.post("/hooks/orders", **signed({"order": {"id": "B7/x"}}, delivery="dlv-3"))
    assert other.json()["thread_id"].startswith("hook-orders-h"), "a value unfit for an id is hashed"

    thread = await wait_for(deps, "hook-orders-A100", replies(2))
    assert [e.type for e in thread.events].count("thread.launched") == 1
    messages = [e for e in thread.events if isinstance(e, MessageReceived)]
    assert [m.key for m in messages] == ["hook:orders:dlv-1", "hook:orders:d2"]
    assert messages[0].text == "Webhook orders:\n" + json.dumps(first, indent=2)
    assert thread.origin == ChannelRef(kind="terminal", address="", user="hook:orders")
    assert {t.id for t in await control.list_threads(deps)} == {"hook-orders-A100", other.json()["thread_id"]}


async def test_without_a_thread_key_a_repeated_body_is_a_duplicate_and_big_payloads_are_cut(
    deps: Deps, start_worker: Any, client: httpx.AsyncClient
) -> None:
    await start_worker()
    payload = {"ticket": 42, "log": "x" * 20_000}
    r = await client.post("/hooks/loose", **signed(payload, delivery="msg_42"))
    assert r.status_code == 202 and r.json()["duplicate"] is False
    tid = r.json()["thread_id"]
    again = signed(payload, delivery="msg_42")
    assert (await client.post("/hooks/loose", **again)).json() == {"thread_id": tid, "duplicate": True}
    another = await client.post("/hooks/loose", **signed({"ticket": 43}))
    assert another.json()["thread_id"] != tid

    thread = await wait_for(deps, tid, replies(1))
    [message] = [e for e in thread.events if isinstance(e, MessageReceived)]
    assert message.user == "hook:loose-desk"
    assert message.text.startswith('Webhook loose:\n{\n  "ticket": 42,\n  "log": "xxx')
    assert message.text.endswith("[payload cut: first 8192 of 20031 bytes shown]")
    assert len(message.text) < 8400


async def test_refused_trigger_requests_publish_nothing(deps: Deps, client: httpx.AsyncClient) -> None:
    ok = {"order": {"id": "A100"}}

    async def refused(status: int, name: str = "orders", **kwargs: Any) -> str:
        r = await client.post(f"/hooks/{name}", **kwargs)
        assert r.status_code == status, r.text
        detail: str = r.json()["detail"]
        return detail

    assert "No matching signature" in await refused(401, **signed(ok, secret=OTHER))
    assert "too old" in await refused(401, **signed(ok, at=int(time.time()) - 3600))
    assert "Missing required headers" in await refused(401, content=json.dumps(ok).encode())
    tampered = signed(ok)
    tampered["content"] = json.dumps({"order": {"id": "A999"}}).encode()
    assert "No matching signature" in await refused(401, **tampered)
    replayed = signed(ok)  # captured, re-sent under a new id: the id is signed
    replayed["headers"] = replayed["headers"] | {"webhook-id": "msg_new"}
    assert "No matching signature" in await refused(401, **replayed)
    assert (await refused(400, **signed(raw=b"not json"))).startswith("body is not JSON: ")
    assert "lone UTF-16 surrogate" in await refused(400, **signed(raw=b'{"order": {"id": "\\ud800"}}'))
    assert await refused(400, **signed([ok])) == "body must be a JSON object, not list"
    assert await refused(404, "nope", **signed(ok)) == "no trigger 'nope'"
    assert await refused(503, "unconfigured", **signed(ok)) == (
        "trigger unconfigured is not configured: set TEST_TRIGGER_SECRET_NEVER_SET"
    )
    assert "over 262144 bytes" in await refused(413, **signed({"blob": "x" * 300_000}))

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts what arrives
        for _ in range(40):
            yield b"x" * 10_000

    assert "over 262144 bytes" in await refused(413, content=chunks(), headers=signed(ok)["headers"])

    assert [await deps.redis.xlen(deps.keys.inbound(p)) for p in range(deps.keys.partitions)] == [0] * 4
    assert await control.list_threads(deps) == []


# -- the whole path: API in, webhooks out ------------------------------------------------------------------------


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The test config's ``ops`` key (an approver of refund-desk); set before the web app reads its keys."""
    monkeypatch.setenv("TEST_API_KEY_OPS", "sk-ops-in-this-test")
    return "sk-ops-in-this-test"


async def test_launched_and_decided_over_the_api_the_subscriber_hears_it_all_signed_and_in_order(
    api_key: str,
    deps: Deps,
    start_worker: Any,
    deliver: Callable[..., None],
    receivers: tuple[Receiver, Receiver],
    client: httpx.AsyncClient,
) -> None:
    audit, _ = receivers
    await start_worker()
    deliver()
    auth = {"Authorization": f"Bearer {api_key}"}
    r = await client.post("/api/v1/threads", json={"agent": "refund-desk", "message": "refund A102 10"}, headers=auth)
    tid = r.json()["thread_id"]
    await audit.wait_for(1)
    [pending] = (await client.get("/api/v1/approvals", headers=auth)).json()["items"]
    r = await client.post(f"/api/v1/approvals/{pending['id']}/decision", json={"approved": True}, headers=auth)
    assert r.status_code == 200
    got = await audit.wait_for(3)
    assert [g.event for g in got] == THREE
    for g in got:
        verify(SECRET, g.headers, g.body)
        assert g.json["thread_id"] == tid and g.json["type"] == g.event and g.delivery == g.json["id"]
    assert got[1].json["event"]["by"] == "api:ops"
    assert got[2].json["event"]["text"] == "Refunded $10.00 on order A102 (R-" + pending["id"][-6:] + ")."
    assert (await threads.load(deps.redis, deps.keys, tid)).status is Status.DONE
