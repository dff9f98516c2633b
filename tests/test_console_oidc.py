"""Signing in to the console through OpenID Connect, against a small OpenID provider run in the test (discovery,
/authorize, /token with PKCE and client authentication, /jwks; RS256 ID tokens signed with a key made here), both
under uvicorn on port-0 sockets, driven with httpx following the redirects by hand, as a browser would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bot import control
from bot.errors import ConfigError
from bot.runtime import Deps
from bot.settings import Settings
from bot.threads import Status
from channels.console import oidc
from tests.conftest import ROOT, status_is, wait_for
from tests.test_console import API, decide

CONFIG = ROOT / "tests" / "config" / "console.yaml"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})  # same key id, another key: a forgery
CLIENT_ID, CLIENT_SECRET = "handrail-console", "s3cret-client-pw"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, config_path=CONFIG)


@dataclasses.dataclass
class Provider:
    """A minimal OpenID provider: /authorize signs in ``user`` at once; the ID token can be spoiled on purpose."""

    base: str = ""
    user: str = "alice"
    key: RSAKey = dataclasses.field(default_factory=lambda: KEY)
    aud: str = CLIENT_ID
    expires_in: int = 300
    nonce: str | None = None  # None: the one the client sent
    claimed_issuer: str = ""  # the discovery document's issuer; empty: the right one
    codes: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse({
                "issuer": self.claimed_issuer or self.base, "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token", "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"], "id_token_signing_alg_values_supported": ["RS256"],
            })  # fmt: skip

        async def authorize(request: Request) -> Response:
            q = request.query_params
            if (q.get("response_type"), q.get("client_id"), q.get("code_challenge_method")) != (
                "code", CLIENT_ID, "S256"
            ) or "openid" not in q.get("scope", "").split():
                return Response("bad authorization request", 400)
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": q["code_challenge"], "nonce": q["nonce"], "redirect": q["redirect_uri"]}
            return RedirectResponse(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}", 302)

        async def token(request: Request) -> Response:
            form = await request.form()
            auth = request.headers.get("authorization", "")
            sent = base64.b64decode(auth.removeprefix("Basic ")).decode() if auth.startswith("Basic ") else ""
            if sent != f"{CLIENT_ID}:{CLIENT_SECRET}":
                return JSONResponse({"error": "invalid_client"}, 401)
            grant = self.codes.pop(str(form.get("code")), None)
            verifier = str(form.get("code_verifier", ""))
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if grant is None or grant["challenge"] != challenge or grant["redirect"] != form.get("redirect_uri"):
                return JSONResponse({"error": "invalid_grant"}, 400)
            now = int(time.time())
            claims = {
                "iss": self.base, "sub": f"id-{self.user}", "aud": self.aud, "iat": now - 5,
                "exp": now + self.expires_in, "nonce": self.nonce or grant["nonce"], "preferred_username": self.user,
            }  # fmt: skip
            id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, self.key)
            return JSONResponse({"access_token": "at", "token_type": "Bearer", "expires_in": 300, "id_token": id_token})

        async def jwks(request: Request) -> Response:
            return JSONResponse({"keys": [KEY.as_dict(private=False)]})

        return Starlette(routes=[
            Route("/.well-known/openid-configuration", discovery), Route("/authorize", authorize),
            Route("/token", token, methods=["POST"]), Route("/jwks", jwks),
        ])  # fmt: skip


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def bound() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def with_oidc(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, allowed: str = "alice,bob"
) -> AsyncIterator[tuple[Provider, httpx.AsyncClient]]:
    """The provider and the console (configured for it, on 127.0.0.1: OIDC makes it ask for a login)."""
    from bot.web import serve

    provider_sock, console_sock = bound(), bound()
    provider = Provider(base=f"http://127.0.0.1:{provider_sock.getsockname()[1]}")
    console_url = f"http://127.0.0.1:{console_sock.getsockname()[1]}"
    for name, value in {
        "HANDRAIL_OIDC_ISSUER": provider.base, "HANDRAIL_OIDC_CLIENT_ID": CLIENT_ID,
        "HANDRAIL_OIDC_CLIENT_SECRET": CLIENT_SECRET, "HANDRAIL_PUBLIC_URL": console_url,
        "HANDRAIL_OIDC_ALLOWED": allowed,
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(deps, stop, sock=console_sock))
    try:
        async with serving(provider.app(), provider_sock), httpx.AsyncClient(base_url=console_url, timeout=10) as c:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.02)
            yield provider, c
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        console_sock.close()


async def sign_in(client: httpx.AsyncClient, tamper_state: bool = False) -> httpx.Response:
    """The browser's trip: console -> issuer's /authorize -> console's callback; the callback's response."""
    start = await client.get("/console/login/oidc", params={"next": "/console/approvals"})
    assert start.status_code == 303, start.text
    cookie = next(c for c in start.headers.get_list("set-cookie") if c.startswith("handrail_oidc="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=600" in cookie
    async with httpx.AsyncClient(timeout=10) as browser_at_issuer:
        back = await browser_at_issuer.get(start.headers["location"])
    assert back.status_code == 302, back.text
    callback = urlsplit(back.headers["location"])
    assert callback.path == oidc.CALLBACK
    query = {k: v[0] for k, v in parse_qs(callback.query).items()}
    if tamper_state:
        query["state"] = secrets.token_urlsafe(32)
    return await client.get(callback.path, params=query)


async def test_a_user_signs_in_through_the_issuer_and_decides_as_their_console_identity(
    deps: Deps, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start_worker()
    accepted = await control.launch(deps, "console-desk", "refund A100", API)
    request = (await wait_for(deps, accepted.thread_id, status_is(Status.WAITING_APPROVAL))).open_approval()
    assert request is not None
    async with with_oidc(deps, monkeypatch) as (provider, client):
        r = await client.get("/console/approvals")
        assert (r.status_code, r.headers["location"]) == (303, "/console/login?next=%2Fconsole%2Fapprovals")
        page = (await client.get(r.headers["location"])).text
        assert f"Sign in with {urlsplit(provider.base).netloc}" in page and 'type="password"' not in page

        provider.user = "bob"  # allowed in, but no approver of this request
        r = await sign_in(client)
        assert r.status_code == 200 and "console:bob" in r.text and 'url=/console/approvals"' in r.text
        session = next(c for c in r.headers.get_list("set-cookie") if c.startswith("handrail_console="))
        assert "HttpOnly" in session and "SameSite=strict" in session
        assert any(c.startswith('handrail_oidc=""') for c in r.headers.get_list("set-cookie"))  # flow used up
        assert "console:bob" in (await client.get("/console/approvals")).text
        r = await decide(client, request.approval_id, action="approve")
        assert "console:bob may not decide this approval" in r.text

        client.cookies.clear()
        provider.user = "alice"
        assert (await sign_in(client)).status_code == 200
        r = await decide(client, request.approval_id, action="approve")
        assert "approved by console:alice" in r.text
        await wait_for(deps, accepted.thread_id, status_is(Status.DONE))


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        ({"tamper_state": True}, "state does not match"),
        ({"key": OTHER_KEY}, "ID token is not valid"),
        ({"aud": "someone-else"}, "ID token is not valid"),
        ({"expires_in": -600}, "ID token is not valid"),
        ({"nonce": "replayed-nonce"}, "ID token is not valid"),
        ({"user": "mallory"}, "mallory may not use this console"),
    ],
    ids=["forged-state", "other-key", "wrong-aud", "expired", "wrong-nonce", "not-allowed"],
)
async def test_a_failed_or_forged_sign_in_logs_nobody_in(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, spoil: dict[str, Any], error: str
) -> None:
    async with with_oidc(deps, monkeypatch) as (provider, client):
        tamper = spoil.pop("tamper_state", False)
        for field, value in spoil.items():
            setattr(provider, field, value)
        r = await sign_in(client, tamper_state=tamper)
        assert r.status_code == 403 and error in r.text, r.text
        assert "Sign-in with" in r.text and CLIENT_SECRET not in r.text
        assert not any(c.startswith("handrail_console=") for c in r.headers.get_list("set-cookie"))
        assert (await client.get("/console/approvals")).status_code == 303


async def test_a_callback_without_the_flow_cookie_is_refused(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    async with with_oidc(deps, monkeypatch) as (_, client):
        r = await client.get(oidc.CALLBACK, params={"code": "x", "state": "y"})
        assert r.status_code == 403 and "was not started here or has expired" in r.text
        assert "handrail_console" not in client.cookies


async def test_an_issuer_whose_discovery_names_another_is_not_followed(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with with_oidc(deps, monkeypatch) as (provider, client):
        provider.claimed_issuer = "https://evil.example.com"
        r = await client.get("/console/login/oidc", params={"next": "/console/approvals"})
        assert r.status_code == 502 and "names issuer &#39;https://evil.example.com&#39;" in r.text
        assert "handrail_oidc" not in client.cookies and "handrail_console" not in client.cookies


async def test_an_allowed_name_removed_from_the_environment_is_logged_out(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with with_oidc(deps, monkeypatch, allowed="*") as (provider, client):
        provider.user = "carol"
        assert (await sign_in(client)).status_code == 200
        cookie = client.cookies["handrail_console"]
        assert "console:carol" in (await client.get("/console/approvals")).text
    async with with_oidc(deps, monkeypatch, allowed="alice") as (_, client):
        client.cookies.set("handrail_console", cookie)
        assert (await client.get("/console/approvals")).status_code == 303


def test_oidc_settings_are_all_or_nothing_and_keep_the_secret_out_of_errors() -> None:
    full = {
        "HANDRAIL_OIDC_ISSUER": "https://id.example.com", "HANDRAIL_OIDC_CLIENT_ID": "handrail",
        "HANDRAIL_OIDC_CLIENT_SECRET": "topsecret-value", "HANDRAIL_PUBLIC_URL": "https://handrail.example.com/",
    }  # fmt: skip
    assert oidc.settings({}) is None
    config = oidc.settings(full, console_users=frozenset({"alice"}))
    assert config is not None
    assert config.redirect_uri == "https://handrail.example.com/console/login/oidc/callback"
    assert config.claim == "preferred_username" and config.host == "id.example.com"
    assert config.allows("alice") and not config.allows("mallory")  # unset: the password users' names only
    assert "topsecret-value" not in repr(config)
    for left_out in ("HANDRAIL_OIDC_CLIENT_ID", "HANDRAIL_OIDC_CLIENT_SECRET", "HANDRAIL_PUBLIC_URL"):
        partial = {k: v for k, v in full.items() if k != left_out}
        with pytest.raises(ConfigError, match=f"set {left_out} too") as exc:
            oidc.settings(partial)
        assert "topsecret-value" not in str(exc.value)
    with pytest.raises(ConfigError, match=re.escape("HANDRAIL_OIDC_ISSUER: expected an https:// URL")):
        oidc.settings({**full, "HANDRAIL_OIDC_ISSUER": "http://id.example.com"})
    with pytest.raises(ConfigError, match="HANDRAIL_OIDC_ALLOWED"):
        oidc.settings({**full, "HANDRAIL_OIDC_ALLOWED": "alice,bad name"})
    anyone = oidc.settings({**full, "HANDRAIL_OIDC_ALLOWED": "*", "HANDRAIL_OIDC_USER_CLAIM": "email"})
    assert anyone is not None and anyone.allows("mallory") and anyone.claim == "email"
