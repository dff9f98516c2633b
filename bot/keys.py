"""Every Redis key Handrail uses, in one place. Keys of one thread share a hash tag (``{t:ID}``)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

INBOUND_GROUP = "workers"


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

    def log(self, thread_id: str) -> str:
        return f"{self.ns}:{{t:{thread_id}}}:log"

    def receipts(self, thread_id: str) -> str:
        return f"{self.ns}:{{t:{thread_id}}}:rcpt"

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
