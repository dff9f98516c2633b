"""Secrets out of text that is shown, logged or stored: URL credentials, token parameters, bearer tokens, API keys.

Tool errors are the main customer: HTTP clients put the URL they called (tokens and all) in their exceptions, and a
tool's error goes to the thread's log, the model's prompt and webhook subscribers.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# query parameters whose value is a secret (names compared lower-case, with - and _ alike)
_SECRET_PARAMS = r"(?:access_token|api_key|apikey|auth|client_secret|code|key|password|passwd|pwd|secret|sig|" \
                 r"signature|token|[a-z_]*_token|[a-z_]*_secret|[a-z_]*_key)"  # fmt: skip
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host -> scheme://user:***@host (and a lone user-info part, often a token)
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/@\s:]*):(?P<secret>[^/@\s]+)@", re.I),
     rf"\g<scheme>\g<user>:{MASK}@"),
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<secret>[^/@\s:]+)@", re.I), rf"\g<scheme>{MASK}@"),
    (re.compile(rf"(?P<name>[?&;]{_SECRET_PARAMS}=)[^&#\s'\"]+", re.I), rf"\g<name>{MASK}"),
    (re.compile(r"\b(?P<kind>Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}", re.I), rf"\g<kind> {MASK}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), f"sk-{MASK}"),  # OpenAI, Anthropic (sk-ant-...) and alike
    (re.compile(r"\b(?P<kind>[spr]k_(?:live|test)_)[A-Za-z0-9]{8,}"), rf"\g<kind>{MASK}"),  # Stripe
    (re.compile(r"\bxox[abeoprs]-[A-Za-z0-9-]{8,}"), f"xox-{MASK}"),  # Slack bot, user and refresh tokens
    (re.compile(r"\bxapp-[A-Za-z0-9-]{8,}"), f"xapp-{MASK}"),  # Slack app-level token
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), f"gh_{MASK}"),  # GitHub tokens
]  # fmt: skip


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ***."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_url(url: str) -> str:
    """A URL fit to print: its password (if any) replaced by ***, e.g. redis://:***@host:6379/0."""
    parts = urlsplit(url)
    if parts.password is None:
        return redact(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]  # as written: port and IPv6 brackets kept
    netloc = f"{user}:{MASK}@{host}"
    return redact(urlunsplit(parts._replace(netloc=netloc)))
