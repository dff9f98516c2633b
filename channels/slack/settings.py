"""Slack's secrets and endpoint, from the environment; absent means the Slack channel is off."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from bot.errors import ConfigError

DEFAULT_API_URL = "https://slack.com/api/"


@dataclass(frozen=True)
class SlackSettings:
    bot_token: str = field(repr=False)
    signing_secret: str = field(repr=False)
    app_token: str | None = field(default=None, repr=False)  # set: also receive events over Socket Mode
    api_url: str = DEFAULT_API_URL  # tests point this at a local fake of the Web API
    api_timeout: float = 30.0  # seconds to wait for a Web API answer before the call counts as failed (retried)
    allow_guests: bool = False  # SLACK_ALLOW_GUESTS: may `slack:*` stand for guests of the workspace too?
    admins: tuple[str, ...] = ()  # SLACK_ADMINS: identities that see every Slack thread in `/handrail threads`

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlackSettings | None:
        """None when Slack is not configured (neither token nor secret set); a half configuration fails loudly."""
        env = os.environ if env is None else env
        token, secret = env.get("SLACK_BOT_TOKEN", ""), env.get("SLACK_SIGNING_SECRET", "")
        if not token and not secret:
            return None
        if not token:
            raise ConfigError("environment", "SLACK_BOT_TOKEN", "not set, but SLACK_SIGNING_SECRET is (set both)")
        if not secret:
            raise ConfigError("environment", "SLACK_SIGNING_SECRET", "not set, but SLACK_BOT_TOKEN is (set both)")
        api_url = env.get("SLACK_API_URL") or DEFAULT_API_URL
        raw_timeout = env.get("SLACK_API_TIMEOUT") or "30"
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = float("nan")
        if not 0 < timeout < 3600:  # nan fails this too
            raise ConfigError("environment", "SLACK_API_TIMEOUT", f"expected seconds, got {raw_timeout!r}") from None
        guests = (env.get("SLACK_ALLOW_GUESTS") or "false").strip().lower()
        if guests not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError("environment", "SLACK_ALLOW_GUESTS", f"expected true or false, got {guests!r}")
        admins = tuple(a.strip() for a in (env.get("SLACK_ADMINS") or "").split(",") if a.strip())
        for a in admins:
            if not a.startswith("slack:") or a == "slack:*":
                raise ConfigError("environment", "SLACK_ADMINS", f"expected slack:T…:U… or slack:U… names, got {a!r}")
        return cls(token, secret, env.get("SLACK_APP_TOKEN") or None, api_url.rstrip("/") + "/", timeout,
                   guests in ("true", "1", "yes"), admins)  # fmt: skip
