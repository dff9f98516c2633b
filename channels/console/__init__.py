"""The browser console: chat with agents, decide approvals, read thread timelines, retry dead letters.

Served by the web process at / (server-rendered pages, htmx and server-sent events; no front-end build). Nothing
is delivered to a console user through an outbox: the pages read the thread logs, so ``delivers`` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.channel import BaseChannel
from bot.runtime import Deps


class ConsoleChannel(BaseChannel):
    name = "console"
    delivers = False

    def routes(self, deps: Deps) -> Sequence[Any]:
        from channels.console.pages import router

        return [router(deps)]


channel = ConsoleChannel()
