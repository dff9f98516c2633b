"""Who is using the console: a login when the web app can be reached from other machines, signed session
cookies, a CSRF token on every POST, and the security headers of every console page.

On a laptop (bound to a loopback address, no password set) the console needs no login: its user is the local
admin, ``console:admin``, as the terminal trusts the machine's accounts. Bound to any other address, or with
HANDRAIL_CONSOLE_PASSWORD set, every page asks for a login: ``admin`` with that password, or a user of
HANDRAIL_CONSOLE_USERS (``alice:PASSWORD,bob:PASSWORD``), or someone signed in through the team's OpenID
Connect issuer (channels/console/oidc.py); a user decides approvals as ``console:<name>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from bot.errors import ConfigError
from bot.runtime import Deps
from channels.console import oidc

COOKIE = "handrail_console"
SESSION_S = 12 * 3600  # a login lasts this long
MAX_FAILS, LOCK_S = 10, 900  # this many failed logins for one name lock it for the rest of this many seconds
ADMIN = "admin"
# No inline script or style anywhere: everything the page runs or wears comes from /console/static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class User:
    name: str
    csrf: str
    local: bool  # no login: the console is bound to this machine only
    sso: bool = False  # signed in through the OpenID Connect issuer

    @property
    def identity(self) -> str:
        return f"console:{self.name}"


def passwords(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The console's users and their passwords, from the environment (ConfigError for a malformed list)."""
    env = os.environ if env is None else env
    users: dict[str, str] = {}
    if env.get("HANDRAIL_CONSOLE_PASSWORD"):
        users[ADMIN] = env["HANDRAIL_CONSOLE_PASSWORD"]
    for item in filter(None, (i.strip() for i in env.get("HANDRAIL_CONSOLE_USERS", "").split(","))):
        name, sep, password = item.partition(":")
        if not (sep and password and name.isascii() and name.replace("-", "").replace(".", "").isalnum()):
            raise ConfigError("environment", "HANDRAIL_CONSOLE_USERS", "expected NAME:PASSWORD[,NAME:PASSWORD...] "
                              "with names of letters, digits, '.' and '-'")  # fmt: skip
        users[name] = password
    return users


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(request: Request) -> str:
    host = request.headers.get("host", "")
    return host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host


class Access:
    """The console's gate for one web app."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.users = passwords()
        self.oidc = oidc.settings(console_users=frozenset(n for n in self.users if n != ADMIN))
        self._signer: URLSafeTimedSerializer | None = None
        self._flow_signer: URLSafeTimedSerializer | None = None

    def login_required(self, request: Request) -> bool:
        """A login is needed unless both ends of the connection are this machine and no password is set."""
        bound = str(getattr(request.app.state, "host", "") or (request.scope.get("server") or ("",))[0])
        client = (request.scope.get("client") or ("",))[0]
        return bool(self.users or self.oidc) or not (_loopback(bound) and _loopback(str(client)))

    async def signer(self) -> URLSafeTimedSerializer:
        """Sessions are signed with HANDRAIL_CONSOLE_SECRET, else with a random key kept in Redis (so every web
        process accepts the same cookies, and a restart keeps people logged in)."""
        if self._signer is None:
            secret = os.environ.get("HANDRAIL_CONSOLE_SECRET", "")
            if not secret:
                key = f"{self.deps.keys.ns}:console:secret"
                await self.deps.redis.set(key, secrets.token_hex(32), nx=True)
                secret = (await self.deps.redis.get(key)).decode()
            self._signer = URLSafeTimedSerializer(secret, salt="handrail-console")
            self._flow_signer = URLSafeTimedSerializer(secret, salt="handrail-console-oidc-flow")
        return self._signer

    async def flow_signer(self) -> URLSafeTimedSerializer:
        """Signs the cookie that holds an OpenID Connect sign-in under way (state, nonce, PKCE verifier)."""
        await self.signer()
        assert self._flow_signer is not None
        return self._flow_signer

    async def session(self, request: Request) -> User | None:
        """The signed-in user of this request, or None."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data: Any = (await self.signer()).loads(raw, max_age=SESSION_S)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("c"), str):
            return None
        local = bool(data.get("l"))
        if local and self.login_required(request):  # a session of the login-free console is no login
            return None
        sso = bool(data.get("o"))
        if sso and not (self.oidc and self.oidc.allows(data["u"])):  # no longer let in through the issuer
            return None
        if not local and not sso and data["u"] not in self.users:  # a user removed from the environment
            return None
        return User(data["u"], data["c"], local, sso)

    async def user(self, request: Request) -> User | None:
        """The user of this request: the session's, or on a login-free console the local admin (a new session
        is set by ``start``). None: a login is needed."""
        found = await self.session(request)
        if found is not None:
            return found
        if self.login_required(request):
            return None
        # Login-free only for this machine's own names: a web page elsewhere cannot reach the console through
        # a DNS name that resolves to 127.0.0.1 (DNS rebinding).
        if not _loopback(_host_name(request)):
            raise HTTPException(400, "the console answers only to localhost, 127.0.0.1 or [::1] without a login")
        return User(ADMIN, secrets.token_urlsafe(24), local=True)

    async def check_password(self, name: str, password: str) -> bool | None:
        """Whether ``password`` is ``name``'s; None while the name is locked after too many failed tries."""
        fails = f"{self.deps.keys.ns}:console:fails:{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        if int(await self.deps.redis.get(fails) or 0) >= MAX_FAILS:
            return None
        expected = self.users.get(name, "")
        digest = hashlib.sha256
        ok = hmac.compare_digest(digest(expected.encode()).digest(), digest(password.encode()).digest())
        if ok and expected:
            await self.deps.redis.delete(fails)
            return True
        pipe = self.deps.redis.pipeline(transaction=True)
        pipe.set(fails, 0, ex=LOCK_S, nx=True)  # the window starts at the first failure (INCR keeps the expiry)
        pipe.incr(fails)
        await pipe.execute()
        return False

    async def start(self, response: Response, request: Request, user: User) -> None:
        """Put ``user``'s session in a signed cookie on ``response``."""
        value = (await self.signer()).dumps({"u": user.name, "c": user.csrf, "l": user.local, "o": user.sso})
        response.set_cookie(
            COOKIE, value, max_age=SESSION_S, httponly=True, samesite="strict", path="/",
            secure=request.url.scheme == "https",
        )  # fmt: skip

    @staticmethod
    def csrf_ok(user: User, token: str) -> bool:
        return bool(token) and hmac.compare_digest(user.csrf.encode(), token.encode())
