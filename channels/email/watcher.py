"""The IMAP watcher (``handrail email``): follows INBOX with IDLE (polling where the server lacks it).

Each new mail is handed to EmailInbound and only then marked \\Seen; ``(UIDVALIDITY, last UID)`` is kept in Redis,
so a restart or a reconnect resumes where it stopped. aioimaplib can hang when the server drops the connection
during IDLE, so every wait has a timeout, after which the client is thrown away and a new one connects (backoff).

One watcher per mailbox at a time: a lease in Redis (SET NX PX, renewed), so two ``handrail up`` processes never
handle the same mail. After a UIDVALIDITY change (a rebuilt mailbox) old UIDs mean nothing: only unseen mail newer
than the newest INTERNALDATE handled before (the watermark) is handled; the rest was handled under the old UIDs.
A mail that could not be checked now (DNS) waits on the retry stream and is tried again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import aioimaplib

from bot.runtime import Deps
from channels.email.inbound import DnsFunc, EmailInbound, Handled, handle_safely
from channels.email.mime import MAX_MAIL
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
BATCH = 50  # mails handled per sync before IDLE is entered again
_NEWS = re.compile(r"^\d+ (EXISTS|RECENT)\b", re.I)
MAX_FAILURES = 3  # tries before a mail that cannot be handled is dead-lettered
MAX_DEFERRALS = 12  # a mail that could not be checked (DNS) this many times, doubling waits, is dead-lettered
LEASE_MS = 15_000  # how soon a dead watcher's mailbox moves to another process
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class ImapFailure(Exception):
    """The server said no, or the connection is gone: reconnect."""


class Watcher:
    def __init__(self, deps: Deps, settings: EmailSettings, *, dns: DnsFunc | None = None,
                 idle: bool = True, lease_ms: int = LEASE_MS) -> None:  # fmt: skip
        self.deps, self.settings, self.use_idle, self.lease_ms = deps, settings, idle, lease_ms
        self.inbound = EmailInbound(deps, settings, dns)
        self.state_key = f"{deps.keys.ns}:email:imap:{settings.imap_user.lower()}@{settings.imap_host.lower()}"
        self.retry_stream = f"{deps.keys.ns}:email:retry"  # `handrail dlq retry` puts dead-lettered mail here
        self.changed = False
        self.connects = 0  # sessions opened (tests watch reconnects)
        self.handled = 0
        self.leading = False  # holds the mailbox's lease now
        self.retry_delay = 30.0  # seconds before a deferred mail is tried again (doubling)
        self.max_bytes = MAX_MAIL  # the most of one mail fetched (held in memory) at all
        self._stop = asyncio.Event()  # set when this watcher must stop handling mail (stop, or the lease lost)

    async def _t(self, aw: Any, extra: float = 0.0) -> Any:
        return await asyncio.wait_for(aw, self.settings.timeout + extra)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop``, but only while this process holds the mailbox's lease."""
        me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lease = f"{self.state_key}:lease"
        while not stop.is_set():
            try:
                if await self.deps.redis.set(lease, me, nx=True, px=self.lease_ms):
                    await self._lead(lease, me, stop)
            except Exception:  # a Redis hiccup: log, breathe, try again
                log.exception("email: the watcher's lease failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)

    async def _lead(self, lease: str, me: str, stop: asyncio.Event) -> None:
        self._stop, self.leading = asyncio.Event(), True
        watching = asyncio.create_task(self._watch(self._stop))
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set() and not watching.done():
                await asyncio.wait({watching, stopping}, timeout=self.lease_ms / 3000,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not stop.is_set() and not await self.deps.redis.eval(_RENEW, 1, lease, me, self.lease_ms):
                    log.warning("email: the mailbox lease moved to another process; this watcher stops")
                    return
        finally:
            self._stop.set()  # the mail being handled finishes; no further mail is begun
            self.leading = False
            stopping.cancel()
            done, _ = await asyncio.wait({watching}, timeout=self.settings.timeout + 5)
            if not done:
                watching.cancel()
            await asyncio.gather(watching, stopping, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.deps.redis.eval(_RELEASE, 1, lease, me)

    async def _watch(self, stop: asyncio.Event) -> None:
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
            validity = self._code(selected.lines, "UIDVALIDITY")
            uidnext = int(self._code(selected.lines, "UIDNEXT") or 0)
            idle = self.use_idle and client.has_capability("IDLE")
            while not stop.is_set():
                self.changed = False
                await self.sync(client, validity, uidnext)
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

    async def sync(self, client: Any, validity: str, uidnext: int = 0) -> None:
        """Handle deferred mail that is due, then every mail after the last UID handled."""
        await self._retry_deferred()
        state = await self._state(validity, uidnext)
        last, floor, floor_until = state["last"], state["floor"], state["floor_until"]
        uids: list[int] = []
        if floor_until > last:  # after a UIDVALIDITY change: only unseen mail newer than the watermark
            since = (datetime.fromtimestamp(floor) - timedelta(days=1)).strftime("%d-%b-%Y")
            uids = await self._search(client, f"UID {last + 1}:{floor_until} UNSEEN SINCE {since}")
        uids += [u for u in await self._search(client, f"UID {max(last, floor_until) + 1}:*") if u > floor_until]
        uids = sorted({u for u in uids if u > last})
        for uid in uids[:BATCH]:
            if self._stop.is_set():
                return  # the lease is gone or we are stopping: the next holder goes on from `last`
            what = f"(UID INTERNALDATE RFC822.SIZE BODY.PEEK[]<0.{self.max_bytes}>)"  # a huge mail: its beginning
            fetched = self._ok(await self._t(client.uid("fetch", str(uid), what), 30), "FETCH")
            mail = next((bytes(x) for x in fetched.lines if isinstance(x, bytearray)), None)
            date = _internaldate(fetched.lines)
            if mail is not None and not (uid <= floor_until and date <= floor):
                result = await handle_safely(self.inbound, mail, _size(fetched.lines))
                if result is None:
                    if not await self._give_up(uid, validity, mail):
                        raise ImapFailure(f"mail UID {uid} could not be handled; retrying after reconnect")
                else:
                    if result.action == "deferred":
                        await self._defer(mail, 0, result)
                    self.handled += 1
                # only now, with its event on the inbound stream, is the mail marked read
                self._ok(await self._t(client.uid("store", str(uid), "+FLAGS", "(\\Seen)")), "STORE")
            watermark = max(state["watermark"], date)
            state["watermark"] = watermark
            await self.deps.redis.hset(self.state_key, mapping={"last": uid, "watermark": watermark})
        if floor_until > last and len(uids) <= BATCH:  # every candidate below the old mailbox's end was seen
            await self.deps.redis.hset(self.state_key, "last", max(floor_until, *uids[:BATCH], last))

    async def _state(self, validity: str, uidnext: int) -> dict[str, int]:
        raw = await self.deps.redis.hmget(self.state_key, "validity", "last", "watermark", "floor", "floor_until")
        values = {k: int(v or 0) for k, v in zip(("last", "watermark", "floor", "floor_until"), raw[1:], strict=True)}
        if raw[0] is not None and raw[0].decode() == validity:
            return values
        if raw[0] is None:  # the first run: every mail in the mailbox is new
            values = {"last": 0, "watermark": 0, "floor": 0, "floor_until": 0}
        else:  # a new UIDVALIDITY: what is below UIDNEXT now was (most of it) handled under the old UIDs
            log.warning(
                "email: UIDVALIDITY changed (%s -> %s): handling only unseen mail newer than %s",
                raw[0].decode(),
                validity,
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(values["watermark"])),
            )
            values = {"last": 0, "watermark": values["watermark"], "floor": values["watermark"],
                      "floor_until": max(uidnext - 1, 0)}  # fmt: skip
        await self.deps.redis.hset(self.state_key, mapping={"validity": validity, **values})
        return values

    async def _search(self, client: Any, criteria: str) -> list[int]:
        found = self._ok(await self._t(client.uid_search(criteria)), "SEARCH")
        return sorted({int(u) for line in found.lines[:-1] for u in _text(line).split() if u.isdigit()})

    async def _retry_deferred(self) -> None:
        """Hand over again the mail on the retry stream that is due (deferred mail, or `handrail dlq retry`)."""
        now = time.time()
        for entry_id, fields in await self.deps.redis.xrange(self.retry_stream, count=BATCH):
            if float(fields.get(b"not_before", 0)) > now:
                continue
            mail = bytes(fields[b"mail"])
            result = await handle_safely(self.inbound, mail)
            if result is None:
                continue
            if result.action == "deferred":
                await self._defer(mail, int(fields.get(b"deferrals", 0)), result)
            await self.deps.redis.xdel(self.retry_stream, entry_id)

    async def _defer(self, mail: bytes, deferrals: int, result: Handled) -> None:
        """Put a mail that could not be checked now on the retry stream, due after a doubling wait."""
        if deferrals + 1 >= MAX_DEFERRALS:
            await self.deps.redis.xadd(self.deps.keys.dlq, {
                "stream": self.retry_stream, "field": "mail", "payload": mail,
                "error": f"mail could not be checked after {deferrals + 1} tries: {result.detail}",
            })  # fmt: skip
            return
        due = time.time() + min(self.retry_delay * 2**deferrals, 6 * 3600)
        await self.deps.redis.xadd(self.retry_stream, {"mail": mail, "deferrals": deferrals + 1, "not_before": due})

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
    def _code(lines: list[Any], name: str) -> str:
        """A response code of SELECT, e.g. [UIDVALIDITY 123] ("0" when the server gave none)."""
        for line in lines:
            m = re.search(rf"{name} (\d+)", _text(line))
            if m:
                return m.group(1)
        return "0"


def _size(lines: list[Any]) -> int:
    """The RFC822.SIZE of a FETCH response (0 when missing)."""
    for line in lines:
        m = re.search(r"RFC822\.SIZE (\d+)", _text(line)) if isinstance(line, bytes) else None
        if m:
            return int(m.group(1))
    return 0


def _internaldate(lines: list[Any]) -> int:
    """The INTERNALDATE of a FETCH response, in Unix seconds (0 when missing)."""
    for line in lines:
        if isinstance(line, bytes):
            m = re.search(r'INTERNALDATE "([^"]+)"', _text(line))
            if m:
                return int(datetime.strptime(m.group(1).strip(), "%d-%b-%Y %H:%M:%S %z").timestamp())
    return 0


def _text(line: Any) -> str:
    return bytes(line).decode(errors="replace") if isinstance(line, bytes | bytearray) else str(line)


async def run_email(deps: Deps, stop: asyncio.Event, *, settings: EmailSettings | None = None) -> None:
    """Watch the mailbox until ``stop`` (idle when email is not configured)."""
    settings = settings or EmailSettings.from_env()
    if settings is None:
        await stop.wait()
        return
    await Watcher(deps, settings).run(stop)
