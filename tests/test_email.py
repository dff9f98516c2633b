"""Email end to end: a real Dovecot (IMAP, LMTP), a real SMTP server relaying into it, the watcher, a worker,
the SMTP deliverer and the web app's decision links. Nothing is faked but DNS (for DKIM keys)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

from bot import approvals, control, threads
from bot.runtime import Deps
from bot.threads import Status, Thread
from channels.email import links
from channels.email.delivery import deliver_email
from channels.email.inbound import EmailInbound
from channels.email.settings import EmailSettings
from channels.email.watcher import Watcher
from tests.conftest import status_is, wait_for, web_client
from tests.mail_servers import DOMAIN, PASSWORD, Dovecot, FakeDns, Relay, dovecot, smtp_relay

# A throwaway key for the tests' own DKIM signatures (published to the injected DNS below), never used elsewhere.
DKIM_KEY = b"""-----BEGIN RSA PRIVATE KEY-----
MIICWwIBAAKBgQDCeiZ/jOZUkEe0uYUa35OgsQtJ9wHOwAy7xgUqPbLF8O3yuevg
Vg+/NbucxsEuSLgZ29p79fFu3mN+pzNpOq2StmAOd4MuYxpCUuFTn52hdUsjHIqC
Hfpeg6+23ZqblRNY78FGC9U0QFBvMcIfE0CE6Rk0X2URs5V6nmKYtc61TwIDAQAB
AoGAIYIid/+zAAcME9uTT5oOObXHmCrzKMh2aTQpV6nhz7E/jn7yYWjytaNwfAbS
6kKlVe9HqewqeUvgIMZ2WT8/AKdxkLAnAiNYkGhjoWWbe20ipYl5sw0z4kr2lWbj
9THBkJhXUhpsWpQwYpcldVKdqwadcsUnQS5Z7MkDR7mSdiECQQDnwIgDggMm02+V
k7WqJ63DZk86DCvPHrIcffdBV8dezWLJ/3byR2NC6ySR9XzNb10gUWBpLCiXBhda
BO/Ho7rrAkEA1tM2P/WCa3YqaLHIMHnT8Q2qWU5xuCp9Ltwig0rOpDXEOm9Sdf7g
TZVhqyI6h2d4wiZhMB+OkqaIG9QqreoOLQJAbRTLMFN+pkS47b+Dr15TxHggbGMU
L73z+cM0oRXu6mljyU4sL2d4iiPhp63Tm2KCg9apuXcmd8dPMHjIX8BqFwJAOowD
m/jIG4tv0WqqWXPKbEbCJ2a2nW+PAGdkTI3ltWEl4psWSSw2a06L+LzyYJa1lYwq
LphbHeKe856mJxHD3QJAahRxVVOaBGNZk3e+GX/6KvwXCZst5GTiduIk3/WpMc57
Rp5pVGrIfjfE8+nL/KcTq57zQU+vBDhUHgrE2XcFWg==
-----END RSA PRIVATE KEY-----
"""
DKIM_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDCeiZ/jOZUkEe0uYUa35OgsQtJ9wHOwAy7xgUqPbLF8O3yuevgVg+/NbucxsEu"
    "SLgZ29p79fFu3mN+pzNpOq2StmAOd4MuYxpCUuFTn52hdUsjHIqCHfpeg6+23ZqblRNY78FGC9U0QFBvMcIfE0CE6Rk0X2URs5V6"
    "nmKYtc61TwIDAQAB"
)
SELECTOR = "test"
BOT = f"bot@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
ALICE = f"alice@{DOMAIN}"
MALLORY = f"mallory@{DOMAIN}"


def dns(name: bytes, timeout: int = 5) -> bytes | None:
    """The injected DNS: example.org publishes the test key under selector "test"."""
    if name.rstrip(b".") == f"{SELECTOR}._domainkey.{DOMAIN}".encode():
        return f"v=DKIM1; k=rsa; p={DKIM_PUBLIC}".encode()
    return None


@dataclass
class Rig:
    deps: Deps
    dovecot: Dovecot
    relay: Relay
    smtp_port: int
    watcher: Watcher
    settings: EmailSettings
    watcher_stop: asyncio.Event
    watcher_task: asyncio.Task[None]

    def configure(self, **changes: Any) -> EmailSettings:
        """Run the watcher's inbound with other settings (DNS stays injected unless a resolver is set)."""
        settings = replace(self.settings, **changes)
        self.watcher.inbound = EmailInbound(self.deps, settings, None if settings.dkim_resolver else dns)
        return settings

    async def stop_watcher(self) -> None:
        self.watcher_stop.set()
        await asyncio.wait_for(self.watcher_task, 15)

    async def send(
        self, sender: str, to: str, text: str, *, subject: str = "Hello", headers: dict[str, str] | None = None,
        sign: bool = True, from_header: str | None = None, tamper: bool = False, attachment: int = 0,
    ) -> str:  # fmt: skip
        """Mail the bot through the real SMTP server; returns the Message-ID."""
        msg = EmailMessage()
        msg["From"] = from_header or sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain=DOMAIN)
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content(text)
        if attachment:
            msg.add_attachment(os.urandom(attachment), maintype="application", subtype="octet-stream",
                               filename="scan.bin")  # fmt: skip
        raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        if sign:
            raw = dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), DKIM_KEY) + raw
        if tamper:  # changed in transit, after signing
            raw = raw.replace(b"approve", b"approve\r\nand more")
        await aiosmtplib.send(raw, sender=sender, recipients=[to], hostname="127.0.0.1", port=self.smtp_port)
        return str(msg["Message-ID"])

    async def mails(self, to: str, count: int, timeout: float = 15.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.relay.mails(to)
            if len(got) >= count:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"{to} got {len(self.relay.mails(to))} mails, not {count}:\n{self.dovecot.log()[-3000:]}")

    async def handled(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.watcher.handled < count:
            assert time.monotonic() < deadline, f"the watcher handled {self.watcher.handled} mails, not {count}"
            await asyncio.sleep(0.05)

    async def only_thread(self) -> Thread:
        rows = [r for r in await control.list_threads(self.deps) if r.id.startswith("email-")]
        assert len(rows) == 1, rows
        return await threads.get(self.deps.redis, self.deps.keys, rows[0].id)


@pytest.fixture
async def mail(deps: Deps, monkeypatch: pytest.MonkeyPatch, start_worker: Any) -> AsyncIterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="handrail-dovecot-") as tmp, dovecot(Path(tmp)) as server, \
            smtp_relay(server.lmtp_port) as (relay, smtp_port):  # fmt: skip
        env = {
            "IMAP_HOST": "127.0.0.1", "IMAP_PORT": str(server.imap_port), "IMAP_SSL": "false", "IMAP_USER": BOT,
            "IMAP_PASSWORD": PASSWORD, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port), "SMTP_STARTTLS": "no",
            "EMAIL_ADDRESS": BOT, "HANDRAIL_PUBLIC_URL": "http://handrail.test", "HANDRAIL_LINK_SECRET": "link-test",
            "EMAIL_DKIM_DOMAINS": DOMAIN, "EMAIL_TIMEOUT": "3", "EMAIL_POLL_SECONDS": "5",
        }  # fmt: skip
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = EmailSettings.from_env()
        assert settings is not None
        await start_worker()
        watcher = Watcher(deps, settings, dns=dns)
        stop, watcher_stop = asyncio.Event(), asyncio.Event()
        watching = asyncio.create_task(watcher.run(watcher_stop))
        tasks = [watching, asyncio.create_task(deliver_email(deps, stop, settings=settings, base_delay=0.05))]
        try:
            yield Rig(deps, server, relay, smtp_port, watcher, settings, watcher_stop, watching)
        finally:
            stop.set()
            watcher_stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)


def count(thread: Thread, type_: str) -> int:
    return sum(1 for e in thread.events if e.type == type_)


def plus_token(mail: EmailMessage) -> str:
    m = re.fullmatch(r"bot\+([a-z0-9]+)@example\.org", str(mail["Reply-To"]))
    assert m, mail["Reply-To"]
    return m.group(1)


async def approval_mail(rig: Rig, text: str = "refund A100 25") -> tuple[Thread, EmailMessage]:
    await rig.send(BOB, BOT, text, subject="Refund please")
    [request] = await rig.mails(ALICE, 1)
    thread = await wait_for(rig.deps, (await rig.only_thread()).id, status_is(Status.WAITING_APPROVAL))
    return thread, request


# -- conversations ----------------------------------------------------------------------------------------------


async def test_a_mail_is_answered_in_its_thread_and_a_reply_continues_it(mail: Rig) -> None:
    first = await mail.send(BOB, BOT, "hello", subject="Question")
    [answer] = await mail.mails(BOB, 1)
    thread = await mail.only_thread()
    token = plus_token(answer)
    headers = {k: str(answer[k]) for k in ("From", "To", "Subject", "In-Reply-To", "References", "Reply-To",
                                           "Auto-Submitted")}  # fmt: skip
    assert headers == {
        "From": f"Handrail <{BOT}>", "To": BOB, "Subject": "Re: Question", "In-Reply-To": first,
        "References": first, "Reply-To": f"bot+{token}@{DOMAIN}", "Auto-Submitted": "auto-generated",
    }  # fmt: skip
    assert re.fullmatch(rf"<[a-z0-9]+\.0\.{thread.id}@{DOMAIN}>", str(answer["Message-ID"]))
    assert answer.get_content().strip().startswith("I can refund orders.")
    # the reply (quoting the answer) lands in the same thread, with only its new text
    threading = {"In-Reply-To": str(answer["Message-ID"]), "References": f"{first} {answer['Message-ID']}"}
    second = await mail.send(BOB, BOT, "refund A101\n\nOn Monday, Handrail wrote:\n> I can refund orders.",
                             subject="Re: Question", headers=threading)  # fmt: skip
    thread = await wait_for(mail.deps, thread.id, status_is(Status.WAITING_APPROVAL))
    said = [e.text for e in thread.events if e.type == "message.received"]  # type: ignore[union-attr]
    assert said == ["hello", "refund A101"]
    assert (await mail.only_thread()).id == thread.id
    # the approver gets a fresh conversation about the approval; the requester hears that it waits, in their own
    [request] = await mail.mails(ALICE, 1)
    assert (request["Subject"], request["In-Reply-To"], request["References"]) == (
        "Approval request: issue_refund (Question)",
        None,
        None,
    )
    _, waiting = await mail.mails(BOB, 2)
    assert (waiting["In-Reply-To"], waiting["References"]) == (second, f"{first} {answer['Message-ID']} {second}")
    assert waiting.get_content().strip() == (
        "Your request is waiting for approval: issue_refund needs a person's decision. "
        "You will hear from me once it is decided."
    )
    assert all(m["Date"] is not None for m in mail.relay.mails(BOB) + mail.relay.mails(ALICE))


# -- approvals --------------------------------------------------------------------------------------------------


async def test_an_approver_approves_by_reply_and_the_tool_runs_once(mail: Rig) -> None:
    thread, request = await approval_mail(mail)
    body = request.get_content()
    assert 'order_id: "A100"' in body and "amount_cents: 2500" in body
    assert 'reply with "approve" or "reject: <reason>"' in body
    assert request["Reply-To"] == f"bot+{plus_token(request)}@{DOMAIN}" and plus_token(request).startswith("a")
    await mail.send(
        ALICE,
        str(request["Reply-To"]),
        "Approve\n\n> Approval needed to run issue_refund",
        subject=f"Re: {request['Subject']}",
        headers={"In-Reply-To": str(request["Message-ID"])},
    )
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    decided = next(e for e in thread.events if e.type == "approval.decided")
    assert (decided.approved, decided.by) == (True, f"email:{ALICE}")  # type: ignore[union-attr]
    assert count(thread, "tool.started") == 2 and count(thread, "tool.result") == 2  # lookup, then the refund once
    waiting, confirmation, done = await mail.mails(BOB, 3)
    assert waiting.get_content().startswith("Your request is waiting for approval")
    assert confirmation.get_content().strip() == f"Approved by email:{ALICE}"
    assert done.get_content().strip().startswith("Refunded $25.00 on order A100")
    # the result threads onto the requester's own conversation: nothing of the approver's mail in its headers
    asked = str(waiting["In-Reply-To"])
    assert done["In-Reply-To"] == asked
    assert set(str(done["References"]).split()) <= {asked, str(waiting["Message-ID"]), str(confirmation["Message-ID"])}
    # the approver is told the decision was taken; a second "approve" is told who decided, and when
    assert request["Subject"] == "Approval request: issue_refund (Refund please)"
    await mail.mails(ALICE, 2)
    assert reply_texts(mail, ALICE)[1] == (
        f"Recorded: approved issue_refund (amount_cents=2500, order_id=A100), by email:{ALICE}."
    )
    await mail.send(ALICE, str(request["Reply-To"]), "approve", subject=f"Re: {request['Subject']}")
    await mail.mails(ALICE, 3)
    assert re.fullmatch(rf"Your reply was not taken as a decision: already approved by email:{ALICE} at .+\.",
                        reply_texts(mail, ALICE)[2])  # fmt: skip


async def test_a_rejection_by_reply_makes_the_agent_replan_with_the_reason(mail: Rig) -> None:
    thread, request = await approval_mail(mail)
    await mail.send(ALICE, str(request["Reply-To"]), "reject: already refunded by the bank\n\n> quoted",
                    subject="Re: x")  # fmt: skip
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    assert count(thread, "tool.started") == 1  # the lookup only
    _, _, reply = await mail.mails(BOB, 3)
    assert reply.get_content().strip() == (
        f"OK, I did not refund it. email:{ALICE} rejected the refund: already refunded by the bank"
    )


async def test_a_link_shows_a_confirm_page_and_decides_once_on_post(mail: Rig) -> None:
    thread, request = await approval_mail(mail)
    approve = re.search(r"Approve: http://handrail\.test(\S+)", request.get_content())
    assert approve
    path = approve.group(1)
    token = path.split("t=", 1)[1]
    async with web_client(mail.deps) as http:
        page = await http.get(path)  # what a mail scanner does: nothing is decided
        assert page.status_code == 200 and "Approve issue_refund?" in page.text and "method='post'" in page.text
        assert (page.headers["X-Frame-Options"], page.headers["Referrer-Policy"]) == ("DENY", "no-referrer")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert (await http.post(path)).status_code == 400  # the token counts only in the form body
        assert (await approvals.get(mail.deps.redis, mail.deps.keys, thread.open_approval().approval_id)).state \
            == "pending"  # type: ignore[union-attr]  # fmt: skip
        tampered = token[:-2] + ("00" if not token.endswith("00") else "11")
        assert (await http.post("/email/decide", data={"t": tampered})).status_code == 400
        expired = links.sign(
            mail.settings,
            links.Link(
                thread.open_approval().approval_id,  # type: ignore[union-attr]
                f"email:{ALICE}",
                True,
                int(time.time()) - 1,
            ),
        )
        refused = await http.post("/email/decide", data={"t": expired})
        assert refused.status_code == 400 and "expired" in refused.text
        first = await http.post("/email/decide", data={"t": token})
        assert first.status_code == 200 and "Recorded: approved" in first.text
        again = await http.post("/email/decide", data={"t": token})
        assert again.status_code == 409 and "lready" in again.text
        reject = re.search(r"Reject: +http://handrail\.test/email/decide\?t=(\S+)", request.get_content())
        assert reject
        late = await http.post("/email/decide", data={"t": reject.group(1)})
        assert late.status_code == 409 and f"<p>Already approved by email:{ALICE} at " in late.text
        assert "lready already" not in late.text.lower()
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    assert count(thread, "approval.decided") == 1 and count(thread, "tool.result") == 2


async def test_forged_broken_automatic_and_tokenless_replies_decide_nothing(mail: Rig) -> None:
    thread, request = await approval_mail(mail)
    reply_to = str(request["Reply-To"])
    await mail.send(MALLORY, reply_to, "approve", from_header=ALICE, sign=False)  # spoofed From, no signature
    await mail.send(ALICE, reply_to, "approve", tamper=True)  # the signature no longer verifies
    await mail.send(ALICE, reply_to, "approve", headers={"Auto-Submitted": "auto-replied"})  # an auto-reply
    await mail.send(ALICE, reply_to.replace("+a", "+b"), "approve")  # a tampered token
    await mail.send(BOB, reply_to, "approve")  # not an approver
    await mail.handled(6)
    record = await approvals.get(mail.deps.redis, mail.deps.keys, thread.open_approval().approval_id)  # type: ignore[union-attr]
    assert record.state == "pending"
    thread = await threads.get(mail.deps.redis, mail.deps.keys, thread.id)
    assert count(thread, "approval.decided") == 0 and thread.status is Status.WAITING_APPROVAL
    # the approver is told about every reply in their name (so a forgery does not go unnoticed), the automatic
    # one aside; the answers go to the approver's own address, never to the forger's
    notes = await mail.mails(ALICE, 4)
    assert sorted(n.get_content().strip() for n in notes[1:]) == [
        "Your reply was not taken as a decision: DKIM signature does not verify.",
        "Your reply was not taken as a decision: example.org signs its mail, but this one has no DKIM signature.",
        "Your reply was not taken as a decision: the reply's token is not valid.",
    ]
    assert mail.relay.mails(MALLORY) == []
    bob_notes = [m.get_content().strip() for m in await mail.mails(BOB, 2) if "not taken" in m.get_content()]
    assert bob_notes == [f"Your reply was not taken as a decision: {BOB} is not one of this request's approvers."]
    assert all(m["Auto-Submitted"] == "auto-generated" for m in mail.relay.mails(ALICE) + mail.relay.mails(BOB))


# -- robustness -------------------------------------------------------------------------------------------------


async def test_a_connection_dropped_during_idle_is_resumed_and_mail_is_handled_once(mail: Rig) -> None:
    await mail.send(BOB, BOT, "hello")
    await mail.mails(BOB, 1)
    await asyncio.sleep(0.5)  # the watcher is in IDLE again
    assert mail.watcher.connects == 1
    mail.dovecot.kick(BOT)
    await mail.send(BOB, BOT, "refund A101", subject="Another")
    deadline = time.monotonic() + 20
    while len(mail.relay.mails(ALICE)) < 1 or mail.watcher.connects < 2:
        assert time.monotonic() < deadline, (mail.watcher.connects, mail.dovecot.log()[-2000:])
        await asyncio.sleep(0.05)
    rows = [r for r in await control.list_threads(mail.deps) if r.id.startswith("email-")]
    assert len(rows) == 2
    await asyncio.sleep(0.5)
    assert mail.watcher.handled == 2 and len(mail.relay.mails(ALICE)) == 1


async def test_bad_mail_never_stops_the_watcher(mail: Rig) -> None:
    raw_mails = [
        b"From: bob@example.org\r\nTo: bot@example.org\r\nSubject: broken\r\nContent-Type: multipart/mixed; "
        b'boundary="nope"\r\n\r\n--nope\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\nqapla\r\n',
        b"To: bot@example.org\r\nSubject: nobody\r\n\r\nno sender\r\n",
        b"From: bob@example.org\r\nTo: bot@example.org\r\n\r\n",
    ]
    for raw in raw_mails:
        signed = dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), DKIM_KEY) + raw if b"From:" in raw else raw
        await aiosmtplib.send(signed, sender=BOB, recipients=[BOT], hostname="127.0.0.1", port=mail.smtp_port)
    await mail.send(BOB, BOT, "x" * 30_000, subject="huge")
    await mail.handled(4)
    deadline = time.monotonic() + 10  # handled means published; the worker applies the launches a moment later
    while len(rows := [r for r in await control.list_threads(mail.deps) if r.id.startswith("email-")]) < 3:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    rows = [r for r in await control.list_threads(mail.deps) if r.id.startswith("email-")]
    texts = []
    for r in rows:
        t = await threads.get(mail.deps.redis, mail.deps.keys, r.id)
        texts.append(next(e.text for e in t.events if e.type == "message.received"))  # type: ignore[union-attr]
    assert len(rows) == 3  # the mail without a From is only logged
    assert any("qapla" in t and "unknown charset 'x-klingon'" in t for t in texts)
    assert any(t.startswith("(the mail had no text)") for t in texts)
    assert any(t.startswith("x" * 20_000) and "cut at 20000 characters" in t for t in texts)


async def test_a_mail_that_keeps_failing_is_dead_lettered_and_the_next_one_handled(
    mail: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = mail.watcher.inbound.handle

    async def failing(raw: bytes, size: int = 0) -> Any:
        if b"poison" in raw:
            raise RuntimeError("cannot handle this one")
        return await handle(raw, size)

    monkeypatch.setattr(mail.watcher.inbound, "handle", failing)
    await mail.send(BOB, BOT, "poison")
    await mail.send(BOB, BOT, "hello", subject="After")
    [answer] = await mail.mails(BOB, 1, timeout=20)
    assert answer["Subject"] == "Re: After"
    [(_, dead)] = await mail.deps.bus.dead_letters()
    assert "could not be handled (3 tries" in dead["error"] and mail.watcher.connects == 3
    monkeypatch.setattr(mail.watcher.inbound, "handle", handle)  # fixed: `handrail dlq retry` hands it over again
    dlq_id = (await mail.deps.bus.dead_letters())[0][0]
    await mail.deps.bus.retry_dead_letter(dlq_id)
    await mail.send(BOB, BOT, "nudge", subject="Nudge")  # the retry is picked up at the next sync
    await mail.mails(BOB, 3, timeout=20)
    assert sorted(str(m["Subject"]) for m in mail.relay.mails(BOB)) == ["Re: After", "Re: Hello", "Re: Nudge"]


async def test_a_mail_to_an_unknown_recipient_is_dead_lettered_at_once_and_the_next_one_goes_out(mail: Rig) -> None:
    """The server answers 5xx for the recipient: no retry would help, and nobody else's mail waits on it."""
    from bot.events import ChannelRef
    from bot.outbox import Outbound, outbox_command

    def reply(n: int, to: str) -> Outbound:
        ref = ChannelRef(kind="email", address=to, user=f"email:{to}", subject="Status")
        return Outbound(id=f"e{n}", thread_id=f"email-test-{n}", ref=ref, kind="text", text=f"note {n}")

    pipe = mail.deps.redis.pipeline(transaction=True)
    for m in (reply(1, f"nobody@{DOMAIN}"), reply(2, BOB)):
        pipe.execute_command(*outbox_command(mail.deps.keys, m))
    await pipe.execute()
    t0 = time.monotonic()
    [sent] = await mail.mails(BOB, 1, timeout=5)
    assert sent.get_content().strip() == "note 2"
    [(_, letter)] = await mail.deps.bus.dead_letters()
    assert time.monotonic() - t0 < 3, "the bad mail was not retried first"
    assert letter["error"].startswith(f"PermanentDeliveryError: smtp 127.0.0.1:{mail.smtp_port}: SMTP")
    assert letter["thread_id"] == "email-test-1" and "nobody" not in str(mail.relay.received)


def test_which_smtp_failures_are_final() -> None:
    """A 5xx about the recipient or the content is final; a 4xx, a lost connection, a refused login are not."""
    from channels.email.delivery import refused_for_good

    unknown = aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown user", "x@example.org")
    full = aiosmtplib.SMTPRecipientRefused(452, "4.2.2 mailbox full", "y@example.org")
    assert refused_for_good(unknown) and refused_for_good(aiosmtplib.SMTPRecipientsRefused([unknown]))
    assert not refused_for_good(aiosmtplib.SMTPRecipientsRefused([unknown, full]))
    assert refused_for_good(aiosmtplib.SMTPDataError(554, "5.7.1 message rejected as spam"))
    assert not refused_for_good(aiosmtplib.SMTPDataError(451, "4.3.0 try again later"))
    assert not refused_for_good(aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"))
    assert not refused_for_good(aiosmtplib.SMTPSenderRefused(550, "5.7.1 not allowed", "bot@example.org"))
    assert not refused_for_good(aiosmtplib.SMTPServerDisconnected("gone"))
    assert not refused_for_good(ConnectionRefusedError())


def test_handrail_email_without_settings_says_what_to_set(env_for: Any) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in env_for().items() if not k.startswith(("IMAP_", "SMTP_", "EMAIL_", "HANDRAIL_LINK"))}
    done = subprocess.run([sys.executable, "-m", "bot.cli", "email"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 1 and "email is not configured: set IMAP_HOST" in done.stderr


# -- pieces -----------------------------------------------------------------------------------------------------


def test_who_vouches_for_a_mail() -> None:
    """Alignment is the From domain or a subdomain of the signer; dmarc=pass counts only from a trusted server, for
    the From domain."""
    from channels.email.auth import aligned, dmarc_pass

    assert aligned("example.org", "example.org") and aligned("mail.example.org", "example.org")
    assert not aligned("example.org", "mail.example.org") and not aligned("badexample.org", "example.org")
    trusted = frozenset({"mx.example.org"})
    ok = "mx.example.org; spf=pass smtp.mailfrom=example.org; dmarc=pass (p=none) header.from=example.org"
    assert dmarc_pass([ok], trusted, "example.org") == "mx.example.org"
    assert dmarc_pass([ok], frozenset({"mx.other.test"}), "example.org") == ""  # not our server
    assert dmarc_pass([ok], trusted, "evil.test") == ""  # another domain passed
    assert dmarc_pass([ok.replace("dmarc=pass", "dmarc=fail")], trusted, "example.org") == ""
    assert dmarc_pass(["mx.example.org 1; dmarc=pass"], trusted, "example.org") == "mx.example.org"


def test_settings_are_all_or_nothing_and_keep_secrets_out_of_repr() -> None:
    from bot.errors import ConfigError

    assert EmailSettings.from_env({}) is None
    assert EmailSettings.from_env({"HANDRAIL_PUBLIC_URL": "https://h.example.com"}) is None  # the console's too
    with pytest.raises(ConfigError, match="IMAP_USER"):
        EmailSettings.from_env({"IMAP_HOST": "imap.example.com"})
    full = {"IMAP_HOST": "imap.example.com", "IMAP_USER": "bot@example.com", "IMAP_PASSWORD": "imap-secret-pw",
            "SMTP_HOST": "smtp.example.com", "SMTP_PASSWORD": "smtp-secret-pw", "EMAIL_ADDRESS": "bot@example.com",
            "HANDRAIL_PUBLIC_URL": "https://h.example.com/", "HANDRAIL_LINK_SECRET": "link-secret-value"}  # fmt: skip
    settings = EmailSettings.from_env(full)
    assert settings is not None and settings.public_url == "https://h.example.com" and settings.imap_port == 993
    assert (settings.unauthenticated_decisions, settings.rate_per_hour, settings.unauthenticated_per_hour,
            settings.unauthenticated_domain_per_hour, settings.dkim_resolver) == (False, 30, 100, 20, "")  # fmt: skip
    tuned = EmailSettings.from_env(full | {
        "EMAIL_UNAUTHENTICATED_DECISIONS": "yes", "EMAIL_TRUSTED_AUTHSERV_IDS": "MX.example.com, mx2.example.com",
        "EMAIL_DKIM_RESOLVER": "10.0.0.53:5353", "EMAIL_DNS_TIMEOUT": "1.5", "EMAIL_UNAUTHENTICATED_PER_HOUR": "7",
    })  # fmt: skip
    assert tuned is not None and tuned.unauthenticated_decisions and tuned.unauthenticated_per_hour == 7
    assert tuned.trusted_authserv_ids == {"mx.example.com", "mx2.example.com"} and tuned.dns_timeout == 1.5
    with pytest.raises(ConfigError, match="EMAIL_DNS_TIMEOUT"):
        EmailSettings.from_env(full | {"EMAIL_DNS_TIMEOUT": "soon"})
    assert not any(secret in repr(settings) for secret in ("imap-secret-pw", "smtp-secret-pw", "link-secret-value"))


def test_the_first_line_of_a_reply_is_the_decision() -> None:
    from channels.email.inbound import verdict

    assert verdict("Approve\n\n> quoted") == (True, "")
    assert verdict("reject: too much\nthanks") == (False, "too much")
    assert verdict("I approve of your hat") is None
    assert verdict("") is None


def test_html_only_mail_is_read_as_text_without_its_quoted_history() -> None:
    from channels.email.mime import parse

    raw = (b"From: Bob <Bob@Example.org>\r\nTo: bot@example.org\r\nMessage-ID: <h1@example.org>\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>refund A100</p><div>On Monday, Handrail wrote:</div>"
           b"<blockquote>&gt; earlier</blockquote>")  # fmt: skip
    mail = parse(raw, "bot@example.org")
    assert (mail.sender, mail.message_id, mail.text, mail.automatic) == ("bob@example.org", "<h1@example.org>",
                                                                          "refund A100", "")  # fmt: skip
    bounce = parse(b"From: MAILER-DAEMON@example.org\r\nReturn-Path: <>\r\n\r\nfailed", "bot@example.org")
    assert bounce.automatic == "null Return-Path (a bounce)"


async def test_an_approvers_reply_without_the_token_is_told_to_reply_to_the_request(mail: Rig) -> None:
    """A mail client that ignores Reply-To sends to the bare address: no decision, and the approver is told why."""
    thread, request = await approval_mail(mail)
    await mail.send(ALICE, BOT, "approve", subject="Re: x", headers={"In-Reply-To": str(request["Message-ID"])})
    _, note = await mail.mails(ALICE, 2)
    assert note.get_content().strip() == ("Your reply was not taken as a decision: the reply does not carry this "
                                          "request's token (reply to the approval mail itself).")  # fmt: skip
    assert note["In-Reply-To"] is not None and note["Reply-To"] == BOT
    thread = await threads.get(mail.deps.redis, mail.deps.keys, thread.id)
    assert thread.status is Status.WAITING_APPROVAL and count(thread, "approval.decided") == 0


# -- authentication, budgets, leases (issue 10) -------------------------------------------------------------------


def reply_texts(rig: Rig, to: str) -> list[str]:
    return [m.get_content().strip() for m in rig.relay.mails(to)]


async def email_threads(rig: Rig) -> list[Thread]:
    rows = [r for r in await control.list_threads(rig.deps) if r.id.startswith("email-")]
    return [await threads.get(rig.deps.redis, rig.deps.keys, r.id) for r in rows]


def first_text(thread: Thread) -> str:
    return next(e.text for e in thread.events if e.type == "message.received")  # type: ignore[union-attr]


def spy(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (sender, action) for every mail the watcher's inbound handles."""
    seen: list[tuple[str, str]] = []
    inbound = rig.watcher.inbound
    handle = inbound.handle

    async def recording(raw: bytes, size: int = 0) -> Any:
        result = await handle(raw, size)
        sender = re.search(rb"(?im)^From: *<?([^>\r\n]+)", raw)
        seen.append((sender.group(1).decode() if sender else "", result.action))
        return result

    monkeypatch.setattr(inbound, "handle", recording)
    return seen


async def test_a_signed_approve_with_a_3_mb_attachment_is_taken_and_the_approver_told(mail: Rig) -> None:
    """DKIM is checked over the whole mail (not a copy cut at 2 MB), and attachment sizes come from the whole mail."""
    await mail.send(BOB, BOT, "refund A100 25", subject="Refund please", attachment=3_000_000)
    [request] = await mail.mails(ALICE, 1, timeout=30)
    thread = await wait_for(mail.deps, (await mail.only_thread()).id, status_is(Status.WAITING_APPROVAL))
    assert "[attachments, not shown: scan.bin (application/octet-stream, 3000000 bytes)]" in first_text(thread)
    await mail.send(ALICE, str(request["Reply-To"]), "approve", subject="Re: x", attachment=3_000_000)
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE), timeout=30)
    decided = next(e for e in thread.events if e.type == "approval.decided")
    assert (decided.approved, decided.by) == (True, f"email:{ALICE}")  # type: ignore[union-attr]
    await mail.mails(ALICE, 2)
    assert reply_texts(mail, ALICE)[1] == (
        f"Recorded: approved issue_refund (amount_cents=2500, order_id=A100), by email:{ALICE}."
    )


async def test_a_dns_timeout_during_dkim_defers_the_decision_until_dns_answers(mail: Rig) -> None:
    """A DKIM key lookup that times out is no verdict: the mail waits and is taken once DNS answers again."""
    fake = FakeDns({f"{SELECTOR}._domainkey.{DOMAIN}": f"v=DKIM1; k=rsa; p={DKIM_PUBLIC}"})
    try:
        mail.configure(dkim_resolver=fake.address, dns_timeout=0.3)  # EMAIL_DKIM_RESOLVER, EMAIL_DNS_TIMEOUT
        mail.watcher.retry_delay = 0.1
        thread, request = await approval_mail(mail)  # bob's signed mail verified through the fake DNS server
        fake.silent = True
        await mail.send(ALICE, str(request["Reply-To"]), "approve", subject="Re: x")
        deadline = time.monotonic() + 15
        while await mail.deps.redis.xlen(mail.watcher.retry_stream) < 1:
            assert time.monotonic() < deadline, "the mail was not deferred"
            await asyncio.sleep(0.05)
        record = await approvals.get(mail.deps.redis, mail.deps.keys, thread.open_approval().approval_id)  # type: ignore[union-attr]
        assert record.state == "pending" and len(mail.relay.mails(ALICE)) == 1  # no verdict, no "not taken"
        fake.silent = False
        await mail.send(BOB, BOT, "hello", subject="Nudge")  # the next sync finds the deferred mail due
        thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE), timeout=20)
        assert count(thread, "approval.decided") == 1
        assert await mail.deps.redis.xlen(mail.watcher.retry_stream) == 0
        assert (await mail.deps.bus.dead_letters()) == []
    finally:
        fake.close()


async def test_dkim_dns_and_mime_work_run_off_the_event_loop(deps: Deps) -> None:
    """A slow DNS answer and a big mail never stall the loop that renews leases and reads streams."""
    settings = EmailSettings.from_env({
        "IMAP_HOST": "127.0.0.1", "IMAP_USER": BOT, "IMAP_PASSWORD": "x", "SMTP_HOST": "127.0.0.1",
        "EMAIL_ADDRESS": BOT, "HANDRAIL_PUBLIC_URL": "http://handrail.test", "HANDRAIL_LINK_SECRET": "s",
    })  # fmt: skip
    assert settings is not None

    def slow_dns(name: bytes, timeout: int = 5) -> bytes | None:
        time.sleep(0.5)
        return dns(name)

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = BOB, BOT, "big", make_msgid(domain=DOMAIN)
    msg.set_content("hello\n" * 200_000)
    msg.add_attachment(os.urandom(2_000_000), maintype="application", subtype="octet-stream", filename="a.bin")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    raw = dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), DKIM_KEY) + raw
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    result = await EmailInbound(deps, settings, slow_dns).handle(raw)
    done.set()
    await ticking
    assert result.action == "launched" and max(gaps) < 0.2, max(gaps)


async def test_decisions_by_reply_need_authentication_by_default(mail: Rig) -> None:
    """Unsigned mail decides nothing even from a domain not listed as signing; a trusted MTA's dmarc=pass does."""
    mail.configure(dkim_domains=frozenset(), trusted_authserv_ids=frozenset({"mx.example.org"}))
    thread, request = await approval_mail(mail)
    reply_to = str(request["Reply-To"])
    await mail.send(ALICE, reply_to, "approve", sign=False)
    untrusted = {"Authentication-Results": f"mx.evil.test; dmarc=pass header.from={DOMAIN}"}
    await mail.send(ALICE, reply_to, "approve", sign=False, headers=untrusted)
    await mail.mails(ALICE, 3)
    why = (f"Your reply was not taken as a decision: the mail is not authenticated: it has no DKIM signature of "
           f"{DOMAIN} and no trusted server reported DMARC pass for it.")  # fmt: skip
    assert reply_texts(mail, ALICE)[1:] == [why, why]
    assert (await threads.get(mail.deps.redis, mail.deps.keys, thread.id)).status is Status.WAITING_APPROVAL
    trusted = {"Authentication-Results": f"mx.example.org; spf=pass; dmarc=pass (p=reject) header.from={DOMAIN}"}
    await mail.send(ALICE, reply_to, "approve", sign=False, headers=trusted)
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    assert count(thread, "approval.decided") == 1


async def test_an_operator_may_opt_out_of_authenticated_decisions(mail: Rig) -> None:
    mail.configure(dkim_domains=frozenset(), unauthenticated_decisions=True)  # EMAIL_UNAUTHENTICATED_DECISIONS
    thread, request = await approval_mail(mail)
    await mail.send(ALICE, str(request["Reply-To"]), "approve", sign=False)
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    assert count(thread, "approval.decided") == 1


def test_email_star_as_an_approver_is_refused_at_config_load(tmp_path: Path) -> None:
    """Anyone can send mail in any name: "email:*" would let a customer approve their own refund."""
    from bot.config import load_config
    from bot.errors import ConfigError

    def config(approvers: str) -> Path:
        path = tmp_path / "handrail.yaml"
        path.write_text(f"""
agents:
  desk:
    step: agents.refunds:refund_desk
    tools: [agents.refunds:lookup_order, agents.refunds:issue_refund]
    approvals:
      issue_refund: {{approvers: {approvers}}}
""")
        return path

    with pytest.raises(ConfigError, match=r"agents\.desk\.approvals\.issue_refund\.approvers: .*'email:\*' is not "
                                          r"allowed: email approvers must be exact addresses"):  # fmt: skip
        load_config(config('["terminal:alice", "email:*"]'))
    loaded = load_config(config('["email:Alice@Example.org"]'))  # senders are compared lower-case
    assert loaded.agents["desk"].approvals["issue_refund"].approvers == ("email:alice@example.org",)


async def test_forged_mail_never_uses_up_a_senders_budget_and_decisions_do_not_count(
    mail: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail.configure(rate_per_hour=1)  # EMAIL_RATE_PER_HOUR
    seen = spy(mail, monkeypatch)
    for i in range(3):  # "From: bob", sent by mallory without bob's signature
        await mail.send(MALLORY, BOT, f"spam {i}", from_header=BOB, sign=False, subject=f"Spam {i}")
    thread, request = await approval_mail(mail)  # bob's genuine mail is within his budget of one
    await mail.send(ALICE, BOT, "hello", subject="Hi")  # alice's one conversation mail this hour
    await mail.mails(ALICE, 2)
    await mail.send(ALICE, str(request["Reply-To"]), "approve", subject="Re: x")  # her decision still counts
    thread = await wait_for(mail.deps, thread.id, status_is(Status.DONE))
    assert [a for _, a in seen] == ["ignored"] * 3 + ["launched", "launched", "decided"]
    await mail.send(ALICE, BOT, "hello again", subject="Hi again")  # over her budget: logged, not answered
    await mail.handled(7)
    assert seen[-1] == (ALICE, "ignored")


async def test_unauthenticated_mail_is_capped_per_domain_and_overall(
    mail: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any sender can be forged: unauthenticated mail the bot would answer has caps (EMAIL_UNAUTHENTICATED_*)."""
    mail.configure(dkim_domains=frozenset(), unauthenticated_domain_per_hour=2, unauthenticated_per_hour=3)
    seen = spy(mail, monkeypatch)
    senders = ["a@spam.test", "b@spam.test", "c@spam.test", "d@other.test", "e@other.test"]
    for sender in senders:
        await mail.send(sender, BOT, "hello", sign=False)
    await mail.handled(5)
    assert seen == [("a@spam.test", "launched"), ("b@spam.test", "launched"), ("c@spam.test", "ignored"),
                    ("d@other.test", "launched"), ("e@other.test", "ignored")]  # fmt: skip


async def test_two_watchers_never_handle_the_same_mail_and_the_second_takes_over(mail: Rig) -> None:
    second = Watcher(mail.deps, mail.settings, dns=dns, lease_ms=1000)
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    try:
        for i in range(3):
            await mail.send(BOB, BOT, f"hello {i}", subject=f"S{i}")
        await mail.mails(BOB, 3)
        await mail.handled(3)
        assert (second.handled, second.connects, len(await email_threads(mail))) == (0, 0, 3)
        await mail.stop_watcher()  # the first lets go of its lease: the second watches from where it stopped
        await mail.send(BOB, BOT, "after", subject="After")
        await mail.mails(BOB, 4)
        assert (mail.watcher.handled, second.handled, len(await email_threads(mail))) == (3, 1, 4)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_crash_between_launch_and_done_marker_leaves_no_orphan_thread(
    mail: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry derives the same thread id from the Message-ID, so it publishes the same launch: dropped."""
    inbound = mail.watcher.inbound
    mark_done = inbound._mark_done
    crashes: list[str] = []

    async def crash_once(key: str, result: Any) -> None:
        if not crashes:
            crashes.append(key)
            raise ConnectionError("gone before the done-marker")
        await mark_done(key, result)

    monkeypatch.setattr(inbound, "_mark_done", crash_once)
    await mail.send(BOB, BOT, "hello", subject="Once")
    await mail.handled(1, timeout=20)
    await mail.mails(BOB, 1)
    [thread] = await email_threads(mail)
    assert crashes and count(thread, "message.received") == 1 and count(thread, "thread.launched") == 1
    await asyncio.sleep(0.3)
    assert len(mail.relay.mails(BOB)) == 1


def imap_append(port: int, mails: list[tuple[bytes, float, str]]) -> None:
    import imaplib

    with imaplib.IMAP4("127.0.0.1", port) as imap:
        imap.login(BOT, PASSWORD)
        for raw, when, flags in mails:
            imap.append("INBOX", flags, imaplib.Time2Internaldate(when), raw)


def signed(text: str) -> bytes:
    raw = (f"From: {BOB}\r\nTo: {BOT}\r\nSubject: {text}\r\nMessage-ID: {make_msgid(domain=DOMAIN)}\r\n\r\n"
           f"{text}\r\n").encode()  # fmt: skip
    return dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), DKIM_KEY) + raw


async def test_after_a_uidvalidity_change_only_unseen_mail_newer_than_the_watermark_is_handled(mail: Rig) -> None:
    await mail.send(BOB, BOT, "hello", subject="Before")
    await mail.mails(BOB, 1)
    await mail.stop_watcher()
    # the mailbox is rebuilt (new UIDVALIDITY) long after: the done-markers of old mail have expired
    await mail.deps.redis.hset(mail.watcher.state_key, "validity", "1")
    for key in await mail.deps.redis.keys(f"{mail.deps.keys.ns}:email:done:*"):
        await mail.deps.redis.delete(key)
    now = time.time()
    await asyncio.to_thread(imap_append, mail.dovecot.imap_port, [
        (signed("old unseen"), now - 2 * 86400, ""), (signed("old seen"), now - 86400, "(\\Seen)"),
        (signed("new unseen"), now + 120, ""),
    ])  # fmt: skip
    watcher = Watcher(mail.deps, mail.settings, dns=dns)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        deadline = time.monotonic() + 15
        while len(await email_threads(mail)) < 2:
            assert time.monotonic() < deadline, "the new mail was not handled"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert sorted(first_text(t) for t in await email_threads(mail)) == ["hello", "new unseen"]
        assert watcher.handled == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_mail_over_the_size_limit_is_read_in_part_and_its_signature_not_trusted(mail: Rig) -> None:
    """Only the first EMAIL max bytes are fetched; a decision in such a mail is refused, and the approver told."""
    mail.watcher.max_bytes = 200_000
    thread, request = await approval_mail(mail)
    await mail.send(BOB, BOT, "look at this", subject="Big", attachment=300_000)
    await mail.send(ALICE, str(request["Reply-To"]), "approve", subject="Re: x", attachment=300_000)
    await mail.mails(ALICE, 2)
    assert reply_texts(mail, ALICE)[1] == (
        "Your reply was not taken as a decision: the mail is too large to check its DKIM signature."
    )
    assert (await threads.get(mail.deps.redis, mail.deps.keys, thread.id)).status is Status.WAITING_APPROVAL
    # a conversation mail that big is taken as unauthenticated mail, with a note saying it was cut
    big = next(t for t in await email_threads(mail) if t.id != thread.id)
    assert "[note: the mail was 0.4 MB; only its first 0.2 MB were read]" in first_text(big)
