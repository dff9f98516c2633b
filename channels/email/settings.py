"""Email's servers, account and secrets, from the environment; absent means the email channel is off."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from bot.errors import ConfigError

REQUIRED = (
    "IMAP_HOST", "IMAP_USER", "IMAP_PASSWORD", "SMTP_HOST", "EMAIL_ADDRESS", "HANDRAIL_PUBLIC_URL",
    "HANDRAIL_LINK_SECRET",
)  # fmt: skip
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EmailSettings:
    imap_host: str
    imap_user: str
    imap_password: str = field(repr=False)
    smtp_host: str
    address: str  # the bot's own address, e.g. bot@example.com; replies come to bot+<token>@example.com
    public_url: str  # where decision links point (the web process)
    link_secret: str = field(repr=False)
    imap_port: int = 993
    imap_ssl: bool = True
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_starttls: bool = True
    dkim_domains: frozenset[str] = frozenset()  # sender domains whose mail must carry a valid, aligned DKIM signature
    poll_seconds: float = 30.0  # without IDLE; also the longest IDLE before it is renewed
    timeout: float = 30.0  # every IMAP/SMTP wait
    rate_per_hour: int = 30  # authenticated mails from one sender acted on per hour (decisions do not count)
    unauthenticated_per_hour: int = 100  # unauthenticated mails the bot answers per hour, all senders together
    unauthenticated_domain_per_hour: int = 20  # ... and per sender domain
    unauthenticated_decisions: bool = False  # opt-out: take decisions by reply without DKIM/DMARC (unsafe)
    trusted_authserv_ids: frozenset[str] = frozenset()  # MTAs whose Authentication-Results dmarc=pass is believed
    dkim_resolver: str = ""  # "host" or "host:port" of the DNS server for DKIM keys ("" = the system's)
    dns_timeout: float = 5.0  # seconds a DKIM key lookup may take before the mail is tried again later
    link_ttl: int = 3 * 24 * 3600  # seconds a decision link works

    @property
    def local(self) -> str:
        return self.address.rsplit("@", 1)[0].lower()

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[-1].lower()

    def plus(self, token: str) -> str:
        return f"{self.local}+{token}@{self.domain}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EmailSettings | None:
        """None when email is not configured (none of the required variables set, the public URL aside); a half
        configuration fails."""
        env = os.environ if env is None else env
        # HANDRAIL_PUBLIC_URL alone is no email configuration: the console's OpenID Connect login uses it too
        given = [k for k in REQUIRED if env.get(k) and k != "HANDRAIL_PUBLIC_URL"]
        if not given:
            return None
        missing = [k for k in REQUIRED if not env.get(k)]
        if missing:
            raise ConfigError("environment", missing[0], f"not set, but {given[0]} is (email needs all of "
                                                          f"{', '.join(REQUIRED)})")  # fmt: skip
        if "@" not in env["EMAIL_ADDRESS"]:
            raise ConfigError("environment", "EMAIL_ADDRESS", "expected an address like bot@example.com")

        def number(name: str, default: str) -> float:
            raw = env.get(name) or default
            try:
                return float(raw)
            except ValueError:
                raise ConfigError("environment", name, f"expected a number, got {raw!r}") from None

        imap_ssl = (env.get("IMAP_SSL") or "true").lower() in _TRUE
        return cls(
            imap_host=env["IMAP_HOST"], imap_user=env["IMAP_USER"], imap_password=env["IMAP_PASSWORD"],
            smtp_host=env["SMTP_HOST"], address=env["EMAIL_ADDRESS"].strip(),
            public_url=env["HANDRAIL_PUBLIC_URL"].rstrip("/"), link_secret=env["HANDRAIL_LINK_SECRET"],
            imap_port=int(number("IMAP_PORT", "993" if imap_ssl else "143")), imap_ssl=imap_ssl,
            smtp_port=int(number("SMTP_PORT", "587")), smtp_user=env.get("SMTP_USER", ""),
            smtp_password=env.get("SMTP_PASSWORD", ""),
            smtp_starttls=(env.get("SMTP_STARTTLS") or "true").lower() in _TRUE,
            dkim_domains=_names(env.get("EMAIL_DKIM_DOMAINS", "")),
            poll_seconds=number("EMAIL_POLL_SECONDS", "30"), timeout=number("EMAIL_TIMEOUT", "30"),
            rate_per_hour=int(number("EMAIL_RATE_PER_HOUR", "30")),
            unauthenticated_per_hour=int(number("EMAIL_UNAUTHENTICATED_PER_HOUR", "100")),
            unauthenticated_domain_per_hour=int(number("EMAIL_UNAUTHENTICATED_DOMAIN_PER_HOUR", "20")),
            unauthenticated_decisions=(env.get("EMAIL_UNAUTHENTICATED_DECISIONS") or "").lower() in _TRUE,
            trusted_authserv_ids=_names(env.get("EMAIL_TRUSTED_AUTHSERV_IDS", "")),
            dkim_resolver=env.get("EMAIL_DKIM_RESOLVER", "").strip(),
            dns_timeout=number("EMAIL_DNS_TIMEOUT", "5"),
            link_ttl=int(number("EMAIL_LINK_TTL", str(3 * 24 * 3600))),
        )  # fmt: skip


def _names(raw: str) -> frozenset[str]:
    """A comma-separated list of domains or server names, lower case."""
    return frozenset(d.strip().lower() for d in raw.split(",") if d.strip())
