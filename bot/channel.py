"""Channels: the one shape every adapter has, found through the ``handrail.channels`` entry points.

The core imports no channel. The CLI and the web app ask the registry what is installed, and each channel says what
it adds to each kind of process: routes for the web app, long-running parts (an IMAP watcher, a deliverer), and the
messages to queue when something happens in a thread. A channel may live in a package of its own:

    [project.entry-points."handrail.channels"]
    fax = "handrail_fax:channel"
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bot.events import Event
from bot.outbox import Outbound
from bot.threads import Thread

if TYPE_CHECKING:
    from bot.runtime import Deps

log = logging.getLogger(__name__)

GROUP = "handrail.channels"

# A long-running part of a process: it runs until the event is set.
Runner = Callable[[asyncio.Event], Awaitable[None]]
# The kinds of process: the web app, agent workers (and delivery), the scheduler, inbound watchers.
Role = Literal["web", "worker", "scheduler", "receive"]
ROLES: tuple[Role, ...] = ("web", "worker", "scheduler", "receive")


class Channel(Protocol):
    """An adapter between Handrail and a place people are (Slack, email, webhooks...)."""

    name: str  # the ChannelRef kind it serves: "slack", "email"...
    delivers: bool  # some process takes messages for this kind from its outbox (else nothing is queued for it)

    def missing(self) -> str | None:
        """What to set in the environment before this channel can run; None when it is configured."""

    def routes(self, deps: Deps) -> Sequence[Any]:
        """FastAPI routers for the web process (none when not configured)."""

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        """What this channel runs in a process of kind ``role`` (none when not configured)."""

    def notify(self, deps: Deps, thread: Thread, event: Event) -> Sequence[tuple[str, Outbound]]:
        """Messages to queue, in the same commit, when ``event`` is recorded: (outbox name, message) pairs."""

    def identity(self, user: str) -> str:
        """How a person of this channel is written in approver lists and decisions (``slack:U123``)."""

    def thread_keys(self) -> Sequence[str]:
        """Suffixes of the per-thread keys this channel keeps (``{t:ID}:<suffix>``): they expire with the thread."""


@cache
def registered() -> dict[str, Channel]:
    """Every installed channel, by the kind it serves."""
    found: dict[str, Channel] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            channel = ep.load()
        except Exception:  # a broken plugin must not take the others down; say which and why
            log.exception("channel %r (%s) could not be loaded", ep.name, ep.value)
            continue
        found[channel.name] = channel
    return found


def runners(deps: Deps, role: Role, only: Sequence[str] = ()) -> list[Runner]:
    """What the registered channels (or only those named) run in a process of kind ``role``."""
    return [r for name, ch in registered().items() if not only or name in only for r in ch.processes(deps, role)]


def thread_keys() -> tuple[str, ...]:
    """The per-thread keys every registered channel keeps, so an expired thread takes them along."""
    return tuple(k for ch in registered().values() for k in ch.thread_keys())


def routes(deps: Deps) -> list[Any]:
    return [router for ch in registered().values() for router in ch.routes(deps)]


def delivered() -> frozenset[str] | None:
    """The channel kinds whose outbox someone reads: messages to any other kind are not queued. None (queue for
    every kind) when no channel is registered at all: an install without its entry points must not go mute."""
    found = registered()
    if not found:
        log.warning("no channels registered (entry points %r): reinstall Handrail (pip install -e .)", GROUP)
        return None
    return frozenset(name for name, ch in found.items() if ch.delivers)


def observers(deps: Deps) -> list[Callable[[Thread, Event], Sequence[tuple[str, Outbound]]]]:
    """Per channel, what to queue when an event is recorded (webhook subscribers hear of approvals this way)."""

    def bind(ch: Channel) -> Callable[[Thread, Event], Sequence[tuple[str, Outbound]]]:
        return lambda thread, event: ch.notify(deps, thread, event)

    return [bind(ch) for ch in registered().values()]


class BaseChannel:
    """Defaults for a channel that has nothing to say on some of the protocol (a convenience, not a requirement)."""

    name = ""
    delivers = True

    def missing(self) -> str | None:
        return None

    def routes(self, deps: Deps) -> Sequence[Any]:
        return ()

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        return ()

    def notify(self, deps: Deps, thread: Thread, event: Event) -> Sequence[tuple[str, Outbound]]:
        return ()

    def identity(self, user: str) -> str:
        return f"{self.name}:{user}"

    def thread_keys(self) -> Sequence[str]:
        return ()
