"""Every Redis key Handrail uses, in one place. Keys of one thread share a hash tag (``{t:ID}``)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

THREAD_SUFFIXES = ("log", "rcpt")  # the core's keys of a thread; channels name theirs (see Keys.thread_keys)


@dataclass(frozen=True)
class Keys:
    ns: str = "hr"
    partitions: int = 16

    def partition(self, thread_id: str) -> int:
        return zlib.crc32(thread_id.encode()) % self.partitions

    def inbound(self, partition: int) -> str:
        return f"{self.ns}:in:{partition}"

    def inbound_for(self, thread_id: str) -> str:
        return self.inbound(self.partition(thread_id))

    def lease(self, partition: int) -> str:
        return f"{self.ns}:lease:{partition}"

    def fence(self, partition: int) -> str:
        return f"{self.ns}:fence:{partition}"

    @property
    def settings(self) -> str:
        """What every process must agree on, recorded at first start (bot/install.py)."""
        return f"{self.ns}:settings"

    @property
    def workers(self) -> str:
        return f"{self.ns}:workers"

    def seen(self, key: str) -> str:
        return f"{self.ns}:seen:{key}"

    def thread_key(self, thread_id: str, suffix: str) -> str:
        """A key that belongs to one thread, a channel's included: it lives and expires with the thread."""
        return f"{self.ns}:{{t:{thread_id}}}:{suffix}"

    def thread_keys(self, thread_id: str, channel_suffixes: Sequence[str] = ()) -> list[str]:
        """Every key a thread owns, for its expiry: its ``{t:ID}`` keys (the core's and the channels' suffixes)
        and its launch's repeat check, so a channel can start a thread of the same id afresh. Its approval
        records are named in its log, not here."""
        tagged = [self.thread_key(thread_id, s) for s in (*THREAD_SUFFIXES, *channel_suffixes)]
        return [*tagged, self.seen(f"launch:{thread_id}")]

    def log(self, thread_id: str) -> str:
        return self.thread_key(thread_id, "log")

    def receipts(self, thread_id: str) -> str:
        return self.thread_key(thread_id, "rcpt")

    @property
    def threads(self) -> str:
        return f"{self.ns}:threads"

    def approval(self, approval_id: str) -> str:
        return f"{self.ns}:ap:{approval_id}"

    @property
    def pending_approvals(self) -> str:
        return f"{self.ns}:ap:pending"

    def outbox(self, address: str) -> str:
        return f"{self.ns}:out:{address}"

    @property
    def dlq(self) -> str:
        return f"{self.ns}:dlq"

    @property
    def retention_lease(self) -> str:
        return f"{self.ns}:retention:lease"

    @property
    def retention_due(self) -> str:
        return f"{self.ns}:retention:due"

    @property
    def retention_cursor(self) -> str:
        return f"{self.ns}:retention:cursor"
