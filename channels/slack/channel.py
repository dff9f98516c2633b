"""The Slack channel as Handrail's core sees it (registered as the ``slack`` entry point in pyproject.toml).

Light on purpose: Bolt and the Web API client are imported only by the parts that run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.channel import BaseChannel, Role, Runner
from bot.runtime import Deps
from channels.slack.settings import SlackSettings


class SlackChannel(BaseChannel):
    """Events and buttons in over HTTP (POST /slack/events) or Socket Mode; replies and approval cards out."""

    name = "slack"

    def missing(self) -> str | None:
        if SlackSettings.from_env() is None:
            return "set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (see README, Slack)"
        return None

    def routes(self, deps: Deps) -> Sequence[Any]:
        settings = SlackSettings.from_env()
        if settings is None:
            return []
        from channels.slack.app import router

        return [router(deps, settings)]

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        settings = SlackSettings.from_env()
        if settings is None:
            return []
        if role == "worker":
            from channels.slack.delivery import deliver_slack

            return [lambda stop: deliver_slack(deps, stop, settings=settings)]
        if role == "web" and settings.app_token is not None:  # Socket Mode: events without a public URL
            from channels.slack.socket_mode import run_socket_mode

            return [lambda stop: run_socket_mode(deps, stop, settings=settings)]
        return []

    def thread_keys(self) -> Sequence[str]:
        from channels.slack.delivery import THREAD_KEY_SUFFIXES

        return THREAD_KEY_SUFFIXES

    def identity(self, user: str) -> str:
        """``slack:T…:U…`` for ``T…:U…`` (a person of any workspace), ``slack:U…`` for the installed one's."""
        from channels.slack.identity import identity

        team, _, member = user.rpartition(":")
        return identity(team, member)


channel = SlackChannel()
