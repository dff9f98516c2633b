"""The email channel as Handrail's core sees it (registered as the ``email`` entry point in pyproject.toml)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.channel import BaseChannel, Role, Runner
from bot.runtime import Deps
from channels.email.settings import EmailSettings


class EmailChannel(BaseChannel):
    """Mail in over IMAP IDLE (the ``receive`` process), replies and approval mails out over SMTP, signed links."""

    name = "email"

    def missing(self) -> str | None:
        if EmailSettings.from_env() is None:
            return (
                "set IMAP_HOST, IMAP_USER, IMAP_PASSWORD, SMTP_HOST, EMAIL_ADDRESS, HANDRAIL_PUBLIC_URL and "
                "HANDRAIL_LINK_SECRET (see README, Email)"
            )
        return None

    def routes(self, deps: Deps) -> Sequence[Any]:
        settings = EmailSettings.from_env()
        if settings is None:
            return []
        from channels.email.links import router

        return [router(deps, settings)]  # the confirm pages of decision links

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        settings = EmailSettings.from_env()
        if settings is None:
            return []
        if role == "worker":
            from channels.email.delivery import deliver_email

            return [lambda stop: deliver_email(deps, stop, settings=settings)]
        if role == "receive":
            from channels.email.watcher import run_email

            return [lambda stop: run_email(deps, stop, settings=settings)]
        return []

    def thread_keys(self) -> Sequence[str]:
        from channels.email.delivery import THREAD_KEY_SUFFIXES

        return THREAD_KEY_SUFFIXES

    def identity(self, user: str) -> str:
        return f"{self.name}:{user.lower()}"


channel = EmailChannel()
