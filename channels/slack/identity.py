"""Who a Slack user is to Handrail: ``slack:T…:U…``, the workspace included.

Configuration may name a member of the installed workspace in the short form ``slack:U…``. The core's approver
check (ApprovalPolicy / the decide script) stays the one place that decides; this module only says which *name* a
person goes by in an approver list: the long form, the short form if they belong to the installed workspace, and
never ``slack:*`` for a guest or someone from another workspace (Slack Connect) unless the settings allow guests.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

KIND = "slack"
WILDCARD = f"{KIND}:*"
GUEST_CACHE_S = 600.0  # users.info answers are kept this long: a guest made a member is seen within ten minutes


def identity(team: str, user: str) -> str:
    return f"{KIND}:{team}:{user}" if team else f"{KIND}:{user}"


@dataclass(frozen=True)
class Person:
    """A Slack user as a request shows them, checked against the installation."""

    team: str  # their own workspace
    user: str
    installed: str  # the workspace the app is installed in (auth.test's team_id)
    guest: bool = False  # a single- or multi-channel guest (users.info: is_restricted / is_ultra_restricted)

    @property
    def long(self) -> str:
        return identity(self.team, self.user)

    @property
    def member(self) -> bool:
        """A full member of the installed workspace: the only people ``slack:*`` stands for (guests may be let in
        by the settings, see ``name_in``)."""
        return self.team == self.installed and not self.guest

    def names(self) -> tuple[str, ...]:
        """Every exact name this person goes by in configuration."""
        short = (f"{KIND}:{self.user}",) if self.team == self.installed else ()
        return (self.long, *short)

    def name_in(self, approvers: Iterable[str], *, allow_guests: bool = False) -> str | None:
        """The name to present to the core's approver check for this list (None: none applies; refuse).
        Named exactly: that name. Otherwise the long form, but only where ``slack:*`` stands for them."""
        listed = tuple(approvers)
        for name in self.names():
            if name in listed:
                return name
        if self.team == self.installed and (not self.guest or allow_guests):
            return self.long  # the core decides (slack:* or not listed at all)
        return None


class GuestCache:
    """users.info's is_restricted / is_ultra_restricted per user, kept for GUEST_CACHE_S."""

    def __init__(self, ttl_s: float = GUEST_CACHE_S) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, bool]] = {}

    def get(self, user: str) -> bool | None:
        hit = self._seen.get(user)
        if hit is None or time.monotonic() - hit[0] > self.ttl_s:
            return None
        return hit[1]

    def put(self, user: str, guest: bool) -> None:
        if len(self._seen) > 10_000:  # bounded: the oldest half goes
            for key in sorted(self._seen, key=lambda k: self._seen[k][0])[:5_000]:
                del self._seen[key]
        self._seen[user] = (time.monotonic(), guest)
