"""A model that cannot be reached: when to try again and when to tell the humans, decided from the log alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.agent import Outage
from bot.events import Event, ModelUnavailable

# A model step that came back (whatever it said) ends an outage.
_MODEL_STEPS = frozenset({"tool.call", "reply", "human.asked", "error"})


@dataclass(frozen=True)
class Retry:
    attempt: int  # failed tries in a row, counting the one that just failed
    delay: float  # seconds until the next try
    notify: bool  # tell the thread's humans now (once per outage)


def current(events: Sequence[Event]) -> list[ModelUnavailable]:
    """The failed tries since the model last answered."""
    out: list[ModelUnavailable] = []
    for e in reversed(events):
        if isinstance(e, ModelUnavailable):
            out.append(e)
        elif e.type in _MODEL_STEPS:
            break
    return list(reversed(out))


def next_retry(events: Sequence[Event], policy: Outage, now_ms: int, retry_after: float | None = None) -> Retry:
    """After one more failed try at ``now_ms``: wait ``retry_first`` doubling up to ``retry_max`` (or what the
    provider asked for, within that cap), and tell the humans once the outage has lasted ``notify_after``."""
    tries = current(events)
    attempt = len(tries) + 1
    delay = min(policy.retry_first * 2 ** (attempt - 1), policy.retry_max)
    if retry_after is not None:
        delay = min(max(delay, retry_after), policy.retry_max)
    began = tries[0].at if tries else now_ms
    told = any(t.notified for t in tries)
    return Retry(attempt, delay, not told and now_ms - began >= policy.notify_after * 1000)
