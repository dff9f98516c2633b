"""Handrail's exceptions, in two families: signals that carry data, and failures that say what to do next."""

from __future__ import annotations


class HandrailError(Exception):
    """A failure the user can act on; the message says what to do."""


class ConfigError(HandrailError):
    """The configuration is wrong: the message names the file, the key and the problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


class ModelNotConfigured(HandrailError):
    """An LLM agent has no usable model: the message names the variable to set."""


class ModelRefused(HandrailError):
    """The model's provider refused the request for good (bad request, context too long, bad key): no retry helps."""


class ModelUnavailableError(Exception):
    """Signal: the model cannot be reached right now (rate limit, timeout, 5xx); try the step again later."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason, self.retry_after = reason, retry_after
        super().__init__(reason)


class NotFound(HandrailError):
    """No thread, approval or dead letter with that id."""


class Conflict(HandrailError):
    """The request no longer fits what it refers to (say, the configuration changed since); nothing was done."""


class LeaseLost(Exception):
    """Signal: another worker now owns this partition; stop writing to it (the fencing token moved on)."""


class LogConflict(Exception):
    """Signal: the thread's log changed since it was read (a retried commit had already been applied)."""


class ApprovalRequired(Exception):
    """Signal: a gated tool call has no matching approved decision; the executor refuses to run it."""

    def __init__(self, tool: str, call_id: str, why: str) -> None:
        self.tool, self.call_id, self.why = tool, call_id, why
        super().__init__(f"refusing to run {tool} ({call_id}): {why}")


class SettingsMismatch(HandrailError):
    """This process's settings differ from those recorded for the installation in Redis; the message says
    which and what to do."""


class DeliveryFailed(Exception):
    """Signal: a channel did not take a message this time (rate limit, outage, timeout); the outbox tries it again
    later, after ``retry_after`` seconds when the channel said how long to wait."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(Exception):
    """Signal: a channel refused a message for good (unknown recipient, a 400, a message Slack will never take);
    the outbox dead-letters it at once with ``reason`` instead of retrying it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
