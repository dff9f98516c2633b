"""Signing in to the console through a team's OpenID Connect issuer (optional, next to the passwords).

Configured by HANDRAIL_OIDC_ISSUER, HANDRAIL_OIDC_CLIENT_ID, HANDRAIL_OIDC_CLIENT_SECRET and HANDRAIL_PUBLIC_URL
(the callback is PUBLIC_URL/console/login/oidc/callback), all or none. The flow is the authorization code with
PKCE: ``state``, ``nonce`` and the code verifier wait in a short-lived signed cookie, the code is exchanged at the
issuer's token endpoint (Authlib), and the ID token is verified with the issuer's published keys (joserfc):
signature, ``iss``, ``aud``, ``exp`` and ``nonce``. The user's name is the HANDRAIL_OIDC_USER_CLAIM claim
(``preferred_username`` by default; no fallback to another claim), let in only if HANDRAIL_OIDC_ALLOWED names it
(``*``: anyone the issuer vouches for; unset: the names of HANDRAIL_CONSOLE_USERS, so no new name appears).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bot.errors import ConfigError

log = logging.getLogger(__name__)

REQUIRED = ("HANDRAIL_OIDC_ISSUER", "HANDRAIL_OIDC_CLIENT_ID", "HANDRAIL_OIDC_CLIENT_SECRET")
CALLBACK = "/console/login/oidc/callback"
FLOW_COOKIE = "handrail_oidc"
FLOW_S = 600  # a sign-in must come back from the issuer within this many seconds
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


class Refused(Exception):
    """A sign-in that logs nobody in; the message is shown to the user (it holds no secret)."""


@dataclass(frozen=True)
class Settings:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    claim: str
    allowed: frozenset[str] | None  # None: anyone the issuer vouches for

    @property
    def host(self) -> str:
        return urlsplit(self.issuer).netloc

    def allows(self, name: str) -> bool:
        return self.allowed is None or name in self.allowed

    def __repr__(self) -> str:  # the secret stays out of logs and tracebacks
        return f"oidc.Settings(issuer={self.issuer!r}, client_id={self.client_id!r}, claim={self.claim!r})"


def _secure(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.netloc)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings(env: Mapping[str, str] | None = None, console_users: frozenset[str] = frozenset()) -> Settings | None:
    """The OIDC settings, None when none is set; ConfigError naming what is missing for a partial set."""
    env = os.environ if env is None else env
    oidc = [k for k in (*REQUIRED, "HANDRAIL_OIDC_USER_CLAIM", "HANDRAIL_OIDC_ALLOWED") if env.get(k)]
    if not oidc:
        return None
    missing = [k for k in (*REQUIRED, "HANDRAIL_PUBLIC_URL") if not env.get(k)]
    if missing:
        raise ConfigError("environment", "HANDRAIL_OIDC_*", f"the console's OpenID Connect login is partly "
                          f"configured: set {', '.join(missing)} too (or unset {', '.join(oidc)})")  # fmt: skip
    issuer, public = env["HANDRAIL_OIDC_ISSUER"], env["HANDRAIL_PUBLIC_URL"].rstrip("/")
    for key, url in (("HANDRAIL_OIDC_ISSUER", issuer), ("HANDRAIL_PUBLIC_URL", public)):
        if not _secure(url):
            raise ConfigError("environment", key, "expected an https:// URL (http:// only for localhost)")
    raw = [a.strip() for a in env.get("HANDRAIL_OIDC_ALLOWED", "").split(",") if a.strip()]
    if raw == ["*"]:
        allowed: frozenset[str] | None = None
    elif any(not NAME.fullmatch(a) for a in raw):
        raise ConfigError("environment", "HANDRAIL_OIDC_ALLOWED", "expected '*' or NAME[,NAME...]")
    else:
        allowed = frozenset(raw) if raw else console_users
    return Settings(
        issuer=issuer, client_id=env["HANDRAIL_OIDC_CLIENT_ID"], client_secret=env["HANDRAIL_OIDC_CLIENT_SECRET"],
        redirect_uri=public + CALLBACK, claim=env.get("HANDRAIL_OIDC_USER_CLAIM") or "preferred_username",
        allowed=allowed,
    )  # fmt: skip


async def _get_json(client: httpx.AsyncClient, url: str, what: str) -> dict[str, Any]:
    try:
        r = await client.get(url)
        r.raise_for_status()
        data = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise Refused(f"could not read the issuer's {what} at {url} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise Refused(f"the issuer's {what} at {url} is not a JSON object")
    return data


async def discover(config: Settings, client: httpx.AsyncClient) -> dict[str, Any]:
    """The issuer's metadata (its endpoints), checked to be the configured issuer's."""
    url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
    meta = await _get_json(client, url, "discovery document")
    if meta.get("issuer") != config.issuer:
        raise Refused(f"the discovery document names issuer {meta.get('issuer')!r}, not {config.issuer!r}")
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(meta.get(field), str) or not _secure(meta[field]):
            raise Refused(f"the issuer's discovery document has no usable {field}")
    return meta


@dataclass(frozen=True)
class Flow:
    """One sign-in under way: what comes back must match it."""

    state: str
    nonce: str
    verifier: str
    next: str

    def dump(self) -> dict[str, str]:
        return {"s": self.state, "n": self.nonce, "v": self.verifier, "x": self.next}

    @classmethod
    def load(cls, data: Any) -> Flow:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in "snvx"):
            raise Refused("this sign-in was not started here or has expired: sign in again")
        return cls(data["s"], data["n"], data["v"], data["x"])


async def begin(config: Settings, next_page: str) -> tuple[str, Flow]:
    """The issuer's authorization URL to send the browser to, and the flow to remember."""
    flow = Flow(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48), next_page)
    async with httpx.AsyncClient(timeout=10) as http:
        meta = await discover(config, http)
    client = AsyncOAuth2Client(config.client_id, scope="openid profile email", redirect_uri=config.redirect_uri,
                               code_challenge_method="S256")  # fmt: skip
    url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=flow.state,
                                             code_verifier=flow.verifier, nonce=flow.nonce)  # fmt: skip
    await client.aclose()
    return url, flow


async def finish(config: Settings, flow: Flow, query: Mapping[str, str]) -> str:
    """The signed-in user's name, once the issuer's answer matches ``flow`` and its ID token is verified."""
    if not hmac.compare_digest(query.get("state", "").encode(), flow.state.encode()):
        raise Refused("this sign-in's state does not match the one started here: sign in again")
    if query.get("error"):
        raise Refused(f"the issuer refused the sign-in: {query['error'][:100]}")
    if not query.get("code"):
        raise Refused("the issuer sent no authorization code")
    async with httpx.AsyncClient(timeout=10) as http:
        meta = await discover(config, http)
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        method = "client_secret_post" if "client_secret_basic" not in methods else "client_secret_basic"
        async with AsyncOAuth2Client(
            config.client_id, config.client_secret, token_endpoint_auth_method=method,
            redirect_uri=config.redirect_uri, timeout=10,
        ) as client:  # fmt: skip
            try:
                token = await client.fetch_token(meta["token_endpoint"], grant_type="authorization_code",
                                                 code=query["code"], code_verifier=flow.verifier)  # fmt: skip
            except Exception as exc:  # Authlib's OAuthError, or the transport's
                error = getattr(exc, "error", "") or type(exc).__name__
                raise Refused(f"the issuer did not exchange the code for a token ({error})") from None
        jwks = await _get_json(http, meta["jwks_uri"], "signing keys")
    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        raise Refused("the issuer's answer has no ID token")
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        claims = jwt.decode(id_token, keys, algorithms=ALGORITHMS).claims
        jwt.JWTClaimsRegistry(
            leeway=60, iss={"essential": True, "value": meta["issuer"]}, exp={"essential": True},
            aud={"essential": True, "value": config.client_id}, nonce={"essential": True, "value": flow.nonce},
        ).validate(claims)  # fmt: skip
    except (JoseError, ValueError, TypeError) as exc:
        raise Refused(f"the ID token is not valid ({getattr(exc, 'error', '') or type(exc).__name__})") from None
    name = claims.get(config.claim)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise Refused(f"the ID token has no usable {config.claim!r} claim for a console name")
    if not config.allows(name):
        raise Refused(f"{name} may not use this console: HANDRAIL_OIDC_ALLOWED does not list them")
    return name
