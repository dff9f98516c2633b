"""Email outbound: the ``email`` outbox sent over SMTP (aiosmtplib), retried by OutboxConsumer, never dropped.

A mail the server refuses for good (a 5xx for its recipient or its content, e.g. 550 unknown user) is
dead-lettered at once; a 4xx, a lost connection or a timeout is retried later while other threads' mail goes on.

Every mail gets a Message-ID derived from the outbox message (a retry re-sends the same Message-ID), In-Reply-To
and References from the thread's mail so far, and a plus-address Reply-To carrying the thread's token — or, for an
approval request, that request's token, which a decision by reply must carry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from bot.errors import DeliveryFailed, PermanentDeliveryError
from bot.outbox import Deliver, Outbound, OutboxConsumer, Receipt
from bot.runtime import Deps
from channels.email import links
from channels.email.mime import compose
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

KIND = "email"
MAX_ATTEMPTS = 12
BASE_DELAY = 0.5
REFS_KEPT = 20


NOTICE_PREFIX = "email-notice-"  # the pseudo-thread of a notice about a mail that belongs to no thread
# The keys this channel keeps per thread: they expire with the thread (bot.retention).
THREAD_KEY_SUFFIXES = ("email:refs", "email:refs:last_in")


def refs_key(deps: Deps, thread_id: str) -> str:
    """The thread's Message-IDs, oldest first: the References of the next mail."""
    return deps.keys.thread_key(thread_id, "email:refs")


def last_in_key(deps: Deps, thread_id: str) -> str:
    """The Message-ID of the thread's latest incoming mail, which the next reply answers."""
    return deps.keys.thread_key(thread_id, "email:refs:last_in")


def msgid_key(deps: Deps, message_id: str) -> str:
    """Which thread a Message-ID (ours or a sender's) belongs to."""
    return f"{deps.keys.ns}:email:mid:{message_id.lower()}"


def approval_mail_key(deps: Deps, message_id: str) -> str:
    """Marks a Message-ID as one of our approval requests (a reply to it without its token is refused)."""
    return f"{deps.keys.ns}:email:amid:{message_id.lower()}"


async def remember(deps: Deps, thread_id: str, message_id: str, *, conversation: bool = True) -> None:
    """Map a Message-ID to its thread; a mail of the requester's conversation also joins the thread's References
    (mails to approvers and notices do not: the requester never received them)."""
    pipe = deps.redis.pipeline(transaction=True)
    pipe.set(msgid_key(deps, message_id), thread_id, ex=links.TOKEN_TTL)
    if conversation and not thread_id.startswith(NOTICE_PREFIX):  # a notice's list would never expire (S14)
        pipe.rpush(refs_key(deps, thread_id), message_id)
        pipe.ltrim(refs_key(deps, thread_id), -REFS_KEPT, -1)
    await pipe.execute()


def _subject(subject: str) -> str:
    subject = subject or "Your message to Handrail"
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"


def _approval_subject(tool: str, subject: str) -> str:
    about = re.sub(r"(?i)^(re:\s*)+", "", subject).strip()
    return f"Approval request: {tool}" + (f" ({about})" if about else "")


def _approval_text(settings: EmailSettings, msg: Outbound, approver: str) -> str:
    assert msg.approval is not None
    args = "\n".join(f"    {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in msg.approval["args"].items())
    reason = f"\nWhy: {msg.approval['reason']}\n" if msg.approval.get("reason") else ""
    text = f"Approval needed to run {msg.approval['tool']} with:\n{args}\n{reason}\n"
    text += 'To decide, reply with "approve" or "reject: <reason>" on the first line.\n'
    if approver:
        expires = int(time.time()) + settings.link_ttl
        yes = links.url(settings, links.Link(msg.approval["id"], approver, True, expires))
        no = links.url(settings, links.Link(msg.approval["id"], approver, False, expires))
        text += f"\nOr open a link (it asks you to confirm):\n  Approve: {yes}\n  Reject:  {no}\n"
    return text


def _waiting_text(msg: Outbound) -> str:
    assert msg.approval is not None
    # the approvers are not named: the requester may be a customer, and approver addresses are internal
    return (f"Your request is waiting for approval: {msg.approval['tool']} needs a person's decision. "
            "You will hear from me once it is decided.")  # fmt: skip


@dataclass(frozen=True)
class Mail:
    message: EmailMessage
    conversation: bool  # part of the requester's conversation (joins the thread's References)
    approval: bool = False  # an approval request to an approver


async def build(deps: Deps, settings: EmailSettings, msg: Outbound) -> list[Mail]:
    """The mails one outbox message becomes. An approval request: one per email approver (each with its own
    links, a fresh conversation with that approver) and a "waiting for approval" note to the requester."""
    extra = msg.ref.model_extra or {}
    refs = [r.decode() for r in await deps.redis.lrange(refs_key(deps, msg.thread_id), 0, -1)]
    in_reply_to = str(extra.get("message_id") or "")
    last_in = await deps.redis.get(last_in_key(deps, msg.thread_id))
    if last_in is not None:
        in_reply_to = last_in.decode()
    subject = _subject(str(extra.get("subject") or ""))
    notice = bool(extra.get("notice"))
    if notice:  # a note about one mail (why it was not a decision, or that it was): threaded to that mail only
        in_reply_to, refs, reply_to = str(extra.get("message_id") or ""), [], settings.address
    else:
        reply_to = settings.plus(await links.thread_token(deps, settings, msg.thread_id))

    def mail(i: str, to: str, text: str, **over: str) -> EmailMessage:
        fields = {"subject": subject, "reply_to": reply_to, "in_reply_to": in_reply_to} | over
        return compose(
            sender=settings.address, to=[to], text=text, message_id=f"<{msg.id}.{i}.{msg.thread_id}@{settings.domain}>",
            references=[*refs[-REFS_KEPT:]] if refs and fields["in_reply_to"] else None, **fields,
        )  # fmt: skip

    if msg.kind == "approval_request" and msg.approval:
        token = settings.plus(await links.approval_token(deps, settings, msg.approval["id"]))
        approvers = [a for a in msg.approval.get("approvers", []) if a.startswith(f"{KIND}:") and "*" not in a]
        out = [Mail(mail(str(i), a.split(":", 1)[1], _approval_text(settings, msg, a), reply_to=token, in_reply_to="",
                         subject=_approval_subject(msg.approval["tool"], str(extra.get("subject") or ""))),
                    conversation=False, approval=True) for i, a in enumerate(approvers)]  # fmt: skip
        if msg.ref.address.lower() not in [a.split(":", 1)[1].lower() for a in approvers]:
            out.append(Mail(mail("w", msg.ref.address, _waiting_text(msg)), conversation=True))
        return out
    text = f"Something went wrong: {msg.text}" if msg.kind == "error" else msg.text
    return [Mail(mail("0", msg.ref.address, text), conversation=not notice)]


def refused_for_good(exc: Exception) -> bool:
    """Whether the SMTP server refused this mail for good: a 5xx about its recipient or its content. A refused
    login or sender address is our own set-up (every mail would fail alike), so it is retried like an outage."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(refused_for_good(r) for r in exc.recipients)
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError):
        return 500 <= exc.code < 600
    return False


def sender(deps: Deps, settings: EmailSettings) -> Deliver:
    """The Deliver function for the ``email`` outbox."""

    async def deliver(msg: Outbound) -> Receipt | None:
        if msg.ref.kind != KIND or not msg.ref.address:
            return None
        mails = await build(deps, settings, msg)
        for out in mails:
            mail = out.message
            await remember(deps, msg.thread_id, str(mail["Message-ID"]), conversation=out.conversation)
            if out.approval:
                await deps.redis.set(approval_mail_key(deps, str(mail["Message-ID"])), 1, ex=links.TOKEN_TTL)
            try:
                await aiosmtplib.send(
                    mail, hostname=settings.smtp_host, port=settings.smtp_port,
                    username=settings.smtp_user or None, password=settings.smtp_password or None,
                    start_tls=settings.smtp_starttls, timeout=settings.timeout,
                )  # fmt: skip
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                # the message never names the password: aiosmtplib does not put it there
                why = f"smtp {settings.smtp_host}:{settings.smtp_port}: {type(exc).__name__}: {exc}"
                if refused_for_good(exc):
                    raise PermanentDeliveryError(why) from None
                raise DeliveryFailed(why) from None
        if msg.thread_id.startswith(NOTICE_PREFIX):
            return None  # nothing ever updates a notice, and its receipt would be a key that never expires (S14)
        return Receipt(channel_id=str(mails[0].message["Message-ID"])) if mails else None

    return deliver


async def deliver_email(
    deps: Deps, stop: asyncio.Event, *, settings: EmailSettings | None = None, max_attempts: int = MAX_ATTEMPTS,
    base_delay: float = BASE_DELAY,
) -> None:  # fmt: skip
    """Deliver the ``email`` outbox until ``stop`` (idle when email is not configured); one process at a time."""
    settings = settings or EmailSettings.from_env()
    if settings is None:
        await stop.wait()
        return
    consumer = OutboxConsumer(
        deps.redis, deps.keys, KIND, sender(deps, settings), consumer="deliverer",
        max_attempts=max_attempts, base_delay=base_delay, claim_idle_ms=0,
    )  # fmt: skip
    await consumer.run_exclusive(stop)
