"""One received mail becomes an event on the inbound stream, or a decision on an approval, or (for machine mail,
forgeries, floods) nothing but a log line.

A decision by mail counts only if all hold: the reply carries the approval's plus token, the sender is one of its
approvers (``email:<address>``), and — for domains that sign their mail, or that EMAIL_DKIM_DOMAINS names — a DKIM
signature verifies and its domain aligns with the From domain.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim

from bot import approvals, control
from bot.agent import ApprovalPolicy
from bot.errors import HandrailError
from bot.events import ChannelRef, new_id
from bot.outbox import Outbound, outbox_command
from bot.runtime import Deps
from channels.email import links
from channels.email.delivery import KIND, NOTICE_PREFIX, approval_mail_key, last_in_key, msgid_key, remember
from channels.email.mime import Incoming, parse
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

DnsFunc = Callable[..., Any]  # dkimpy's TXT lookup: (name: bytes, timeout: int) -> bytes | None
_APPROVE = re.compile(r"^\s*(approve|approved)\b[\s.!]*$", re.I)
_REJECT = re.compile(r"^\s*(reject|rejected|deny|denied)\b\s*[:\-]?\s*(?P<reason>.*)$", re.I)
SEEN_TTL = 30 * 24 * 3600


def identity(address: str) -> str:
    return f"{KIND}:{address.lower()}"


def verdict(text: str) -> tuple[bool, str] | None:
    """The decision on the first line: (approved, reason), or None when the line is neither."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if _APPROVE.match(first):
        return True, ""
    m = _REJECT.match(first)
    return (False, m["reason"].strip()) if m else None


@dataclass(frozen=True)
class Handled:
    """What became of a mail (for logs and tests)."""

    action: str  # launched | sent | answered | decided | refused | ignored | duplicate
    detail: str = ""
    thread_id: str = ""


class EmailInbound:
    def __init__(self, deps: Deps, settings: EmailSettings, dns: DnsFunc | None = None) -> None:
        self.deps, self.settings, self.dns = deps, settings, dns

    def _key(self, name: str) -> str:
        return f"{self.deps.keys.ns}:email:{name}"

    async def handle(self, raw: bytes) -> Handled:
        """Turn one mail into its effects; safe to call again for the same mail (keyed by Message-ID)."""
        mail = parse(raw, self.settings.address)
        done_key = self._key(f"done:{mail.message_id.lower()}")
        if await self.deps.redis.exists(done_key):
            return Handled("duplicate", mail.message_id)
        result = await self._handle(mail)
        await self.deps.redis.set(done_key, result.action, ex=SEEN_TTL)
        log.info("email: %s from %s: %s %s", mail.message_id, mail.sender or "?", result.action, result.detail)
        return result

    async def _handle(self, mail: Incoming) -> Handled:
        if mail.automatic:
            return Handled("ignored", f"automatic mail ({mail.automatic})")
        if not mail.sender or "@" not in mail.sender:
            return Handled("ignored", "no readable From address")
        if not await self._within_rate(mail.sender):
            return Handled("ignored", f"rate limit for {mail.sender}")
        dkim_problem = self._dkim_problem(mail)
        tokens = self._tokens(mail)
        for token in tokens:
            target = await links.resolve(self.deps, token)
            if target is not None and target[0] == "approval":
                return await self._decide(mail, target[1], dkim_problem)
        if verdict(mail.text) is not None:
            if tokens and not any([await links.resolve(self.deps, t) for t in tokens]):
                return await self._refuse(mail, "the reply's token is not valid", forged=bool(dkim_problem))
            if await self._answers_approval_mail(mail):
                why = "the reply does not carry this request's token (reply to the approval mail itself)"
                return await self._refuse(mail, why, forged=bool(dkim_problem))
        if dkim_problem:
            return Handled("ignored", f"looks forged: {dkim_problem}")
        thread_id = await self._thread_of(mail, tokens)
        return await self._converse(mail, thread_id)

    # -- checks

    async def _within_rate(self, sender: str) -> bool:
        key = self._key(f"rate:{sender}:{int(time.time() // 3600)}")
        pipe = self.deps.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 3700)
        count, _ = await pipe.execute()
        return int(count) <= self.settings.rate_per_hour

    def _dkim_problem(self, mail: Incoming) -> str:
        """Why the mail's DKIM does not vouch for its From domain ("" when it does or none is expected)."""
        domain = mail.sender.rsplit("@", 1)[-1]
        signed = b"\ndkim-signature:" in b"\n" + mail.raw.lower().split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
        if not signed and domain not in self.settings.dkim_domains:
            return ""
        if not signed:
            return f"{domain} signs its mail, but this one has no DKIM signature"
        try:
            checker = dkim.DKIM(mail.raw)
            ok = checker.verify(dnsfunc=self.dns) if self.dns else checker.verify()
        except Exception as exc:  # dkimpy raises on malformed signatures
            return f"DKIM signature unreadable ({type(exc).__name__})"
        if not ok:
            return "DKIM signature does not verify"
        signer = (checker.domain or b"").decode().lower()
        if not (domain == signer or domain.endswith("." + signer)):
            return f"DKIM signer {signer} does not align with From domain {domain}"
        return ""

    def _tokens(self, mail: Incoming) -> list[str]:
        """Plus tokens in the addresses the mail was sent to (bot+<token>@domain)."""
        local, domain = self.settings.local, self.settings.domain
        out = []
        for address in mail.recipients:
            user, _, dom = address.partition("@")
            if dom == domain and user.startswith(local + "+"):
                out.append(user[len(local) + 1 :])
        return list(dict.fromkeys(out))

    async def _answers_approval_mail(self, mail: Incoming) -> bool:
        """Whether the mail answers one of our approval requests (by In-Reply-To or References)."""
        for message_id in [mail.in_reply_to, *mail.references]:
            if message_id and await self.deps.redis.exists(approval_mail_key(self.deps, message_id)):
                return True
        return False

    async def _thread_of(self, mail: Incoming, tokens: list[str]) -> str | None:
        """In-Reply-To first, then References (newest first), then the plus token."""
        for message_id in [mail.in_reply_to, *reversed(mail.references)]:
            if message_id:
                tid = await self.deps.redis.get(msgid_key(self.deps, message_id))
                if tid is not None:
                    return str(tid.decode())
        for token in tokens:
            target = await links.resolve(self.deps, token)
            if target is not None and target[0] == "thread":
                return target[1]
        return None

    # -- effects

    def _ref(self, mail: Incoming, to_address: str = "", *, notice: bool = False) -> ChannelRef:
        fields = {"kind": KIND, "address": mail.sender, "user": identity(mail.sender), "subject": mail.subject,
                  "message_id": mail.message_id, "to": to_address}  # fmt: skip
        return ChannelRef.model_validate(fields | ({"notice": True} if notice else {}))

    def _text(self, mail: Incoming) -> str:
        text = mail.text or "(the mail had no text)"
        if mail.attachments:
            text += "\n\n[attachments, not shown: " + "; ".join(mail.attachments) + "]"
        if mail.notes:
            text += "\n\n[note: " + "; ".join(mail.notes) + "]"
        return text

    async def _converse(self, mail: Incoming, thread_id: str | None) -> Handled:
        deps, key = self.deps, f"email:{mail.message_id.lower()}"
        if thread_id is None or not await control.known(deps, thread_id):
            ours = next((a for a in mail.recipients if a.endswith("@" + self.settings.domain)), self.settings.address)
            to_address = re.sub(r"\+[^@]*@", "@", ours)
            agent = deps.agents.route(KIND, to_address)
            tid = f"email-{new_id()}"
            await self._record_inbound(tid, mail)
            await control.launch(deps, agent, self._text(mail), self._ref(mail, to_address), thread_id=tid, key=key)
            return Handled("launched", agent, tid)
        await self._record_inbound(thread_id, mail)
        await control.receive(deps, thread_id, self._text(mail), self._ref(mail), key=key, start=False)
        return Handled("sent", "", thread_id)  # an answer, if the thread waits on a human: the worker says

    async def _record_inbound(self, thread_id: str, mail: Incoming) -> None:
        await remember(self.deps, thread_id, mail.message_id)
        await self.deps.redis.set(last_in_key(self.deps, thread_id), mail.message_id, ex=links.TOKEN_TTL)

    async def _decide(self, mail: Incoming, approval_id: str, dkim_problem: str) -> Handled:
        if dkim_problem:
            return Handled("ignored", f"decision refused, looks forged: {dkim_problem}")
        try:
            record = await approvals.get(self.deps.redis, self.deps.keys, approval_id)
        except HandrailError:
            return await self._refuse(mail, "this approval no longer exists")
        who = identity(mail.sender)
        if not ApprovalPolicy(record.approvers).allows(who):
            return await self._refuse(mail, f"{mail.sender} is not one of this request's approvers", record.thread_id)
        said = verdict(mail.text)
        if said is None:
            return await self._refuse(
                mail, 'the first line of your reply must be "approve" or "reject: <reason>"', record.thread_id
            )
        approved, reason = said
        outcome = await control.decide(self.deps, approval_id, by=who, approved=approved, feedback=reason)
        if outcome.result != "ok":
            return await self._refuse(mail, outcome.message, record.thread_id)
        await self._record_inbound(record.thread_id, mail)
        return Handled("decided", outcome.state, record.thread_id)

    async def _refuse(self, mail: Incoming, why: str, thread_id: str = "", *, forged: bool = False) -> Handled:
        """No decision; a short answer to the sender (only a log line when the sender may be forged)."""
        if forged:
            return Handled("ignored", f"no decision ({why}); not answered: looks forged")
        msg = Outbound(
            id=new_id(), thread_id=thread_id or f"{NOTICE_PREFIX}{new_id()}", ref=self._ref(mail, notice=True),
            kind="text",
            text=f"Your reply was not taken as a decision: {why}.",
        )  # fmt: skip
        await self.deps.redis.execute_command(*outbox_command(self.deps.keys, msg))
        return Handled("refused", why, thread_id)


async def handle_safely(inbound: EmailInbound, raw: bytes) -> Handled | None:
    """Handle a mail; a failure is logged and None returned (the watcher retries it on the next sync)."""
    try:
        return await asyncio.wait_for(inbound.handle(raw), 60)
    except Exception:
        log.exception("email: could not handle a mail (%d bytes); it stays unread and is retried", len(raw))
        return None
