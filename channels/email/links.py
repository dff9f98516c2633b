"""Reply tokens and signed decision links, and the confirm page a link opens (GET shows, POST decides).

A plus-address token (``bot+<token>@domain``) ties a reply to its thread or to one approval request; tokens are
HMACs of the id under HANDRAIL_LINK_SECRET, looked up in Redis, so a guessed or altered token finds nothing.
A link carries the approval, the approver, the verdict and an expiry, signed; it decides once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from bot import approvals, control
from bot.errors import HandrailError
from bot.runtime import Deps
from channels.email.settings import EmailSettings

log = logging.getLogger(__name__)

TOKEN_TTL = 180 * 24 * 3600  # seconds a reply token keeps working


def _mac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def token_key(deps: Deps, token: str) -> str:
    return f"{deps.keys.ns}:email:tok:{token}"


async def thread_token(deps: Deps, settings: EmailSettings, thread_id: str) -> str:
    token = "t" + _mac(settings.link_secret, f"thread:{thread_id}")[:20]
    await deps.redis.set(token_key(deps, token), f"thread:{thread_id}", ex=TOKEN_TTL)
    return token


async def approval_token(deps: Deps, settings: EmailSettings, approval_id: str) -> str:
    token = "a" + _mac(settings.link_secret, f"approval:{approval_id}")[:20]
    await deps.redis.set(token_key(deps, token), f"approval:{approval_id}", ex=TOKEN_TTL)
    return token


async def resolve(deps: Deps, token: str) -> tuple[str, str] | None:
    """What a plus token stands for: ("thread", id) or ("approval", id); None for an unknown token."""
    raw = await deps.redis.get(token_key(deps, token.lower()))
    if raw is None:
        return None
    kind, _, ident = raw.decode().partition(":")
    return kind, ident


@dataclass(frozen=True)
class Link:
    approval_id: str
    approver: str  # identity, e.g. email:alice@example.com
    approve: bool
    expires: int  # unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign(settings: EmailSettings, link: Link) -> str:
    body = _b64(json.dumps([link.approval_id, link.approver, link.approve, link.expires]).encode())
    return f"{body}.{_mac(settings.link_secret, 'link:' + body)[:40]}"


def verify(settings: EmailSettings, token: str, now: float | None = None) -> Link | str:
    """The link a token carries, or why it is refused."""
    body, _, sig = token.partition(".")
    if not body or not hmac.compare_digest(_mac(settings.link_secret, "link:" + body)[:40].encode(), sig.encode()):
        return "This link is not valid (it was altered or is incomplete)."
    try:
        aid, who, approve, expires = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        link = Link(str(aid), str(who), bool(approve), int(expires))
    except (ValueError, TypeError):
        return "This link is not valid."
    if (time.time() if now is None else now) > link.expires:
        return "This link has expired; reply to the mail instead, or ask for a new one."
    return link


def url(settings: EmailSettings, link: Link) -> str:
    return f"{settings.public_url}/email/decide?t={sign(settings, link)}"


# The page runs no script, loads nothing, may not be framed (clickjacking a one-click decision) and posts only to
# itself; the token in its URL must not leak through Referer or caches.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='robots' content='noindex'></head><body><h1>{html.escape(title)}</h1>{body}</body></html>",
        status_code=status, headers=SECURITY_HEADERS,
    )  # fmt: skip


def router(deps: Deps, settings: EmailSettings) -> APIRouter:
    """GET /email/decide shows what would be decided (and decides nothing); POST decides, once."""
    api = APIRouter(tags=["email"])

    @api.get("/email/decide", include_in_schema=False)
    async def confirm_page(t: str = "") -> HTMLResponse:
        link = verify(settings, t)
        if isinstance(link, str):
            return _page("Refused", f"<p>{html.escape(link)}</p>", 400)
        try:
            record = await approvals.get(deps.redis, deps.keys, link.approval_id)
        except HandrailError:
            return _page("Not found", "<p>This approval no longer exists.</p>", 404)
        if record.state != "pending":
            return _page("Already decided", f"<p>Already {html.escape(record.state)} by {html.escape(record.by)}.</p>")
        verb = "Approve" if link.approve else "Reject"
        args = html.escape(json.dumps(record.args, indent=2, ensure_ascii=False))
        reason = "" if link.approve else "<p><label>Reason <input name='reason' size='60'></label></p>"
        return _page(
            f"{verb} {record.tool}?",
            f"<pre>{args}</pre><form method='post'><input type='hidden' name='t' value='{html.escape(t)}'>"
            f"{reason}<button type='submit'>{verb}</button></form>",
        )

    @api.post("/email/decide", include_in_schema=False)
    async def decide(request: Request) -> HTMLResponse:
        form = parse_qs((await request.body()).decode(errors="replace"))
        t = (form.get("t") or [""])[0]  # the form body only: a scanner posting to the mailed URL decides nothing
        link = verify(settings, t)
        if isinstance(link, str):
            return _page("Refused", f"<p>{html.escape(link)}</p>", 400)
        used = f"{deps.keys.ns}:email:link:{hashlib.sha256(t.encode()).hexdigest()[:32]}"
        if not await deps.redis.set(used, "1", nx=True, ex=max(60, link.expires - int(time.time()) + 60)):
            return _page("Already decided", "<p>This link was already used.</p>", 409)
        reason = (form.get("reason") or [""])[0][:2000]
        try:
            outcome = await control.decide(deps, link.approval_id, by=link.approver, approved=link.approve,
                                           feedback=reason)  # fmt: skip
        except Exception:
            await deps.redis.delete(used)  # no decision was made: the link still works
            raise
        if outcome.result == "decided":
            return _page("Already decided", f"<p>{html.escape(outcome.message.capitalize())}.</p>", 409)
        if outcome.result != "ok":
            return _page("Refused", f"<p>{html.escape(outcome.message)}.</p>", 403)
        log.info("email: approval %s %s by %s (link)", link.approval_id, outcome.state, link.approver)
        return _page("Done", f"<p>Recorded: {html.escape(outcome.state)}. You can close this page.</p>")

    return api
