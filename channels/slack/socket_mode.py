"""Slack over Socket Mode: the same Bolt app, fed through a WebSocket Slack opens to us (no public URL)."""

from __future__ import annotations

import asyncio

from bot.runtime import Deps
from channels.slack.settings import SlackSettings


async def run_socket_mode(deps: Deps, stop: asyncio.Event, *, settings: SlackSettings | None = None) -> None:
    """Receive Slack's events over Socket Mode (no public URL) until ``stop``; idle without SLACK_APP_TOKEN."""
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    from channels.slack.app import SlackInbound  # imported here: Bolt's Socket Mode needs aiohttp

    settings = settings or SlackSettings.from_env()
    if settings is None or settings.app_token is None:
        await stop.wait()
        return
    handler = AsyncSocketModeHandler(SlackInbound(deps, settings).app, settings.app_token)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    try:
        await stop.wait()
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]
