"""The IMAP watcher (``handrail email``): follows INBOX with IDLE (polling where the server lacks it).

Each new mail is handed to EmailInbound and only then marked \\Seen; ``(UIDVALIDITY, last UID)`` is kept in Redis,
so a restart or a reconnect resumes where it stopped. aioimaplib can hang when the server drops the connection
during IDLE, so every wait has a timeout, after which the client is thrown away and a new one connects (backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

import aioimaplib

from bot.runtime import Deps
from channels.email.inbound import DnsFunc, EmailInbound, handle_safely
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
BATCH = 50  # mails handled per sync before IDLE is entered again
_NEWS = re.compile(r"^\d+ (EXISTS|RECENT)\b", re.I)
MAX_FAILURES = 3  # tries before a mail that cannot be handled is dead-lettered


class ImapFailure(Exception):
    """The server said no, or the connection is gone: reconnect."""


class Watcher:
    def __init__(self, deps: Deps, settings: EmailSettings, *, dns: DnsFunc | None = None,
                 idle: bool = True) -> None:  # fmt: skip
        self.deps, self.settings, self.use_idle = deps, settings, idle
        self.inbound = EmailInbound(deps, settings, dns)
        self.state_key = f"{deps.keys.ns}:email:imap:{settings.imap_user.lower()}@{settings.imap_host.lower()}"
        self.retry_stream = f"{deps.keys.ns}:email:retry"  # `handrail dlq retry` puts dead-lettered mail here
        self.changed = False
        self.connects = 0  # sessions opened (tests watch reconnects)
        self.handled = 0

    async def _t(self, aw: Any, extra: float = 0.0) -> Any:
        return await asyncio.wait_for(aw, self.settings.timeout + extra)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop``: reconnect with backoff whenever the session fails."""
        backoff, connects = 0.5, self.connects
        while not stop.is_set():
            try:
                await self.session(stop)
                backoff = 0.5
            except Exception as exc:  # network, server or protocol trouble: a fresh connection fixes most of it
                if self.connects > connects:  # it had logged in: start the backoff afresh
                    backoff, connects = 0.5, self.connects
                log.warning("email: IMAP session ended (%s: %s); reconnecting in %.1fs", type(exc).__name__, exc,
                            backoff)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def session(self, stop: asyncio.Event) -> None:
        s = self.settings
        cls = aioimaplib.IMAP4_SSL if s.imap_ssl else aioimaplib.IMAP4
        client = cls(host=s.imap_host, port=s.imap_port, timeout=s.timeout)
        try:
            await self._t(client.wait_hello_from_server())
            self._ok(await self._t(client.login(s.imap_user, s.imap_password)), "LOGIN")
            self.connects += 1
            selected = self._ok(await self._t(client.select("INBOX")), "SELECT")
            validity = self._uidvalidity(selected.lines)
            idle = self.use_idle and client.has_capability("IDLE")
            while not stop.is_set():
                self.changed = False
                await self.sync(client, validity)
                if self.changed:  # mail arrived while syncing (an EXISTS among the replies): sync again first
                    continue
                if idle:
                    await self._idle(client, stop)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), s.poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logout(), 2)
            with contextlib.suppress(Exception):
                client.protocol.transport.close()

    async def _idle(self, client: Any, stop: asyncio.Event) -> None:
        """Wait in IDLE until the server reports something, ``stop`` or poll_seconds pass (then renew)."""
        s = self.settings
        idle = await self._t(client.idle_start(timeout=s.poll_seconds + s.timeout))
        pushed = asyncio.create_task(client.wait_server_push(timeout=s.poll_seconds))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({pushed, stopping}, timeout=s.poll_seconds + 1, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            pushed.cancel()
        if client.protocol.state == aioimaplib.LOGOUT or client.protocol.transport.is_closing():
            raise ImapFailure("connection lost during IDLE")
        client.idle_done()
        # a dropped connection makes this time out (aioimaplib never completes it); an EXISTS that came before the
        # server's "+ idling" lands in the IDLE command's own reply, not in the push queue: _ok notices it
        self._ok(await self._t(idle), "IDLE")

    async def sync(self, client: Any, validity: str) -> None:
        """Handle every mail after the last UID handled (all of them if UIDVALIDITY changed)."""
        for entry_id, fields in await self.deps.redis.xrange(self.retry_stream, count=BATCH):
            if await handle_safely(self.inbound, bytes(fields[b"mail"])) is not None:
                await self.deps.redis.xdel(self.retry_stream, entry_id)
        raw = await self.deps.redis.hmget(self.state_key, "validity", "last")
        last = int(raw[1]) if raw[0] is not None and raw[0].decode() == validity and raw[1] else 0
        if raw[0] is None or raw[0].decode() != validity:
            await self.deps.redis.hset(self.state_key, mapping={"validity": validity, "last": last})
        found = self._ok(await self._t(client.uid_search(f"UID {last + 1}:*")), "SEARCH")
        uids = sorted({int(u) for line in found.lines[:-1] for u in _text(line).split() if u.isdigit()})
        for uid in [u for u in uids if u > last][:BATCH]:
            fetched = self._ok(await self._t(client.uid("fetch", str(uid), "(BODY.PEEK[])"), 30), "FETCH")
            mail = next((bytes(x) for x in fetched.lines if isinstance(x, bytearray)), None)
            if mail is not None:
                if await handle_safely(self.inbound, mail) is None:
                    if not await self._give_up(uid, validity, mail):
                        raise ImapFailure(f"mail UID {uid} could not be handled; retrying after reconnect")
                else:
                    self.handled += 1
            # only now, with its event on the inbound stream, is the mail marked read
            self._ok(await self._t(client.uid("store", str(uid), "+FLAGS", "(\\Seen)")), "STORE")
            await self.deps.redis.hset(self.state_key, "last", uid)

    async def _give_up(self, uid: int, validity: str, mail: bytes) -> bool:
        """After MAX_FAILURES tries, a mail that keeps failing goes to the dead-letter stream and is passed over."""
        key = f"{self.state_key}:fail:{validity}:{uid}"
        failures = int(await self.deps.redis.incr(key))
        await self.deps.redis.expire(key, 86400)
        if failures < MAX_FAILURES:
            return False
        await self.deps.redis.xadd(self.deps.keys.dlq, {
            "stream": self.retry_stream, "field": "mail", "payload": mail,
            "error": f"mail UID {uid} could not be handled ({failures} tries; see the email process's log)",
        })  # fmt: skip
        log.error("email: mail UID %s failed %d times; dead-lettered and passed over", uid, failures)
        return True

    def _ok(self, response: Any, what: str) -> Any:
        # an untagged EXISTS/RECENT in any reply means new mail; IDLE would not report it again
        self.changed = self.changed or any(_NEWS.match(_text(x)) for x in response.lines if isinstance(x, bytes))
        if response.result != "OK":
            raise ImapFailure(f"{what}: {response.result} {[_text(x) for x in response.lines][-1:]}")
        return response

    @staticmethod
    def _uidvalidity(lines: list[Any]) -> str:
        for line in lines:
            m = re.search(r"UIDVALIDITY (\d+)", _text(line))
            if m:
                return m.group(1)
        return "0"


def _text(line: Any) -> str:
    return bytes(line).decode(errors="replace") if isinstance(line, bytes | bytearray) else str(line)


async def run_email(deps: Deps, stop: asyncio.Event, *, settings: EmailSettings | None = None) -> None:
    """Watch the mailbox until ``stop`` (idle when email is not configured)."""
    settings = settings or EmailSettings.from_env()
    if settings is None:
        await stop.wait()
        return
    await Watcher(deps, settings).run(stop)
