"""One received mail becomes an event on the inbound stream, or a decision on an approval, or (for machine mail,
forgeries, floods) nothing but a log line.

A decision by mail counts only if all hold: the reply carries the approval's plus token, the sender is one of its
approvers (``email:<address>``), and the mail is authenticated (channels.email.auth: an aligned DKIM signature or a
trusted MTA's dmarc=pass) unless EMAIL_UNAUTHENTICATED_DECISIONS opts out. Every decision by reply is answered:
taken, already decided, or why not.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass

from bot import approvals, control
from bot.agent import ApprovalPolicy
from bot.errors import HandrailError
from bot.events import ChannelRef, new_id
from bot.outbox import Outbound, outbox_command
from bot.runtime import Deps
from channels.email import links
from channels.email.auth import Auth, DnsFunc, TemporaryAuthFailure, authenticate, resolver
from channels.email.delivery import KIND, NOTICE_PREFIX, approval_mail_key, last_in_key, msgid_key, remember
from channels.email.mime import Incoming, parse
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

__all__ = ["DnsFunc", "EmailInbound", "Handled", "handle_safely", "thread_id_for", "verdict"]

_APPROVE = re.compile(r"^\s*(approve|approved)\b[\s.!]*$", re.I)
_REJECT = re.compile(r"^\s*(reject|rejected|deny|denied)\b\s*[:\-]?\s*(?P<reason>.*)$", re.I)
SEEN_TTL = 30 * 24 * 3600


def identity(address: str) -> str:
    return f"{KIND}:{address.lower()}"


def thread_id_for(message_id: str) -> str:
    """The thread a new conversation's first mail starts: derived from its Message-ID, so handling the mail again
    (after a crash, or in a second watcher) publishes the same launch, which the bus drops as a repeat."""
    return "email-" + hashlib.sha256(message_id.lower().encode()).hexdigest()[:24]


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

    action: str  # launched | sent | answered | decided | refused | ignored | duplicate | deferred
    detail: str = ""
    thread_id: str = ""


class EmailInbound:
    def __init__(self, deps: Deps, settings: EmailSettings, dns: DnsFunc | None = None) -> None:
        self.deps, self.settings = deps, settings
        self.dns = dns or resolver(settings.dkim_resolver, settings.dns_timeout)

    def _key(self, name: str) -> str:
        return f"{self.deps.keys.ns}:email:{name}"

    async def handle(self, raw: bytes, size: int = 0) -> Handled:
        """Turn one mail into its effects; safe to call again for the same mail (keyed by Message-ID). "deferred"
        means it could not be checked now (DNS): nothing was done, and it should be handed over again later."""
        mail = await asyncio.to_thread(parse, raw, self.settings.address, size)  # MIME work is CPU-bound on big mail
        done_key = self._key(f"done:{mail.message_id.lower()}")
        if await self.deps.redis.exists(done_key):
            return Handled("duplicate", mail.message_id)
        try:
            result = await self._handle(mail)
        except TemporaryAuthFailure as exc:
            log.warning("email: %s from %s: deferred (%s)", mail.message_id, mail.sender or "?", exc)
            return Handled("deferred", str(exc))
        await self._mark_done(done_key, result)
        log.info("email: %s from %s: %s %s", mail.message_id, mail.sender or "?", result.action, result.detail)
        return result

    async def _mark_done(self, done_key: str, result: Handled) -> None:
        await self.deps.redis.set(done_key, result.action, ex=SEEN_TTL)

    async def _handle(self, mail: Incoming) -> Handled:
        if mail.automatic:
            return Handled("ignored", f"automatic mail ({mail.automatic})")
        if not mail.sender or "@" not in mail.sender:
            return Handled("ignored", "no readable From address")
        auth = await self._authenticate(mail)
        tokens = self._tokens(mail)
        for token in tokens:
            target = await links.resolve(self.deps, token)
            if target is not None and target[0] == "approval":
                return await self._decide(mail, target[1], auth)
        if verdict(mail.text) is not None:
            if tokens and not any([await links.resolve(self.deps, t) for t in tokens]):
                return await self._refuse(mail, "the reply's token is not valid", auth=auth)
            if await self._answers_approval_mail(mail):
                why = "the reply does not carry this request's token (reply to the approval mail itself)"
                return await self._refuse(mail, why, auth=auth)
        if auth.problem:
            return Handled("ignored", f"looks forged: {auth.problem}")
        over = await self._over_budget(mail, auth)
        if over:
            return Handled("ignored", over)
        thread_id = await self._thread_of(mail, tokens)
        return await self._converse(mail, thread_id)

    # -- checks

    async def _authenticate(self, mail: Incoming) -> Auth:
        s = self.settings
        return await asyncio.to_thread(
            authenticate, mail.raw, mail.sender, dns_lookup=self.dns, required_domains=s.dkim_domains,
            trusted=s.trusted_authserv_ids, complete=not mail.truncated,
        )  # fmt: skip

    async def _count(self, name: str, limit: int) -> bool:
        """Count one more in this hour's ``name``; whether it is still within ``limit``."""
        key = self._key(f"rate:{name}:{int(time.time() // 3600)}")
        pipe = self.deps.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 3700)
        count, _ = await pipe.execute()
        return int(count) <= limit

    async def _over_budget(self, mail: Incoming, auth: Auth) -> str:
        """Why the bot must not act on (and answer) this mail now ("" when it may). Only authenticated mail counts
        against its sender: forged mail in bob's name never uses up bob's budget. Unauthenticated mail, which any
        sender can forge, has caps per domain and for all senders together (the bot answers from our domain)."""
        s = self.settings
        if auth.verified:
            ok = await self._count(f"from:{mail.sender}", s.rate_per_hour)
            return "" if ok else f"rate limit for {mail.sender} ({s.rate_per_hour} an hour)"
        domain = mail.sender.rsplit("@", 1)[-1]
        if not await self._count(f"unauth-domain:{domain}", s.unauthenticated_domain_per_hour):
            return f"unauthenticated mail from {domain} over {s.unauthenticated_domain_per_hour} an hour"
        if not await self._count("unauth", s.unauthenticated_per_hour):
            return f"unauthenticated mail over {s.unauthenticated_per_hour} an hour"
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
            tid = thread_id_for(mail.message_id)
            await self._record_inbound(tid, mail)
            await control.launch(deps, agent, self._text(mail), self._ref(mail, to_address), thread_id=tid, key=key)
            return Handled("launched", agent, tid)
        await self._record_inbound(thread_id, mail)
        await control.receive(deps, thread_id, self._text(mail), self._ref(mail), key=key, start=False)
        return Handled("sent", "", thread_id)  # an answer, if the thread waits on a human: the worker says

    async def _record_inbound(self, thread_id: str, mail: Incoming) -> None:
        await remember(self.deps, thread_id, mail.message_id)
        await self.deps.redis.set(last_in_key(self.deps, thread_id), mail.message_id, ex=links.TOKEN_TTL)

    async def _decide(self, mail: Incoming, approval_id: str, auth: Auth) -> Handled:
        """A reply to an approval request: always answered (taken, already decided, or why not), except when it is
        not authenticated and its sender is not an approver (then it is someone else's forgery: a log line)."""
        try:
            record = await approvals.get(self.deps.redis, self.deps.keys, approval_id)
        except HandrailError:
            return await self._refuse(mail, "this approval no longer exists", auth=auth)
        if record.state != "pending":  # a settled record keeps no approver list: say who decided, and when
            settled = approvals.Outcome("decided", record.state, record.by, record.at)
            return await self._refuse(mail, settled.message, record.thread_id, auth=auth)
        who = identity(mail.sender)
        if not ApprovalPolicy(record.approvers).allows(who):
            why = f"{mail.sender} is not one of this request's approvers"
            return await self._refuse(mail, why, record.thread_id, auth=auth)
        if auth.problem or not (auth.verified or self.settings.unauthenticated_decisions):
            domain = mail.sender.rsplit("@", 1)[-1]
            return await self._refuse(mail, auth.why_not(domain), record.thread_id, auth=auth, approver=True)
        said = verdict(mail.text)
        if said is None:
            why = 'the first line of your reply must be "approve" or "reject: <reason>"'
            return await self._refuse(mail, why, record.thread_id, auth=auth, approver=True)
        approved, reason = said
        outcome = await control.decide(self.deps, approval_id, by=who, approved=approved, feedback=reason)
        if outcome.result != "ok":
            return await self._refuse(mail, outcome.message, record.thread_id, auth=auth, approver=True)
        # the reply joins the thread's lookup (a further reply finds it), not the requester's References
        await self.deps.redis.set(msgid_key(self.deps, mail.message_id), record.thread_id, ex=links.TOKEN_TTL)
        shown = [f"{k}={str(v)[:100]}" for k, v in list(record.args.items())[:5]]
        what = f"{record.tool} ({', '.join(shown)}{', …' if len(record.args) > 5 else ''})"
        text = f"Recorded: {outcome.state} {what}, by {who}." + (f"\nReason: {reason}" if reason else "")
        await self._notify(mail, text, record.thread_id)
        return Handled("decided", outcome.state, record.thread_id)

    async def _refuse(self, mail: Incoming, why: str, thread_id: str = "", *, auth: Auth,
                      approver: bool = False) -> Handled:  # fmt: skip
        """No decision; a short answer to the sender. An unauthenticated sender is answered only when it is an
        approver of the request (so the answer goes to a known address, never to any forged one) and within
        the caps for unauthenticated mail."""
        if not auth.verified:
            if not approver:
                return Handled("ignored", f"no decision ({why}); not answered: not authenticated")
            over = await self._over_budget(mail, auth)
            if over:
                return Handled("ignored", f"no decision ({why}); not answered: {over}")
        await self._notify(mail, f"Your reply was not taken as a decision: {why}.", thread_id)
        return Handled("refused", why, thread_id)

    async def _notify(self, mail: Incoming, text: str, thread_id: str = "") -> None:
        """A short mail to the sender, threaded to their mail only."""
        msg = Outbound(
            id=new_id(), thread_id=thread_id or f"{NOTICE_PREFIX}{new_id()}", ref=self._ref(mail, notice=True),
            kind="text", text=text,
        )  # fmt: skip
        await self.deps.redis.execute_command(*outbox_command(self.deps.keys, msg))


async def handle_safely(inbound: EmailInbound, raw: bytes, size: int = 0) -> Handled | None:
    """Handle a mail; a failure is logged and None returned (the watcher retries it on the next sync)."""
    try:
        return await asyncio.wait_for(inbound.handle(raw, size), 60)
    except Exception:
        log.exception("email: could not handle a mail (%d bytes); it stays unread and is retried", len(raw))
        return None
