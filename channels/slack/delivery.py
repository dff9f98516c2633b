"""Slack outbound: the ``slack`` outbox delivered through the Web API, retried on 429 and 5xx, never dropped.

A call that failed for now raises ``DeliveryFailed`` (with Slack's Retry-After when it gave one): OutboxConsumer
sets the message aside, tries again later and dead-letters it only after many attempts (``handrail dlq list`` /
``dlq retry``), while other threads' messages go on. A message Slack will never take (``channel_not_found``,
``msg_too_long``, ``invalid_blocks``...) raises ``PermanentDeliveryError`` and is dead-lettered at once. The ts
of each message sent is kept as its receipt, so a decision later finds its approval card and updates it in place.

``chat.postMessage`` has no idempotency key, and a call that timed out may have been posted all the same. So each
message carries its outbox id as message metadata, and each attempt is noted first: a message tried before is
looked up (``conversations.replies`` in a thread, ``conversations.history`` at top level) before it is posted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import approvals, threads
from bot.errors import DeliveryFailed, NotFound, PermanentDeliveryError
from bot.events import ApprovalDecided, ApprovalRequested, ThreadCancelled
from bot.outbox import Deliver, Outbound, OutboxConsumer, Receipt
from bot.runtime import Deps
from channels.slack import cards
from channels.slack.app import KIND, web_client
from channels.slack.settings import SlackSettings

log = logging.getLogger(__name__)

METADATA_TYPE = "handrail_outbox"  # the event_type of the metadata each message carries: its outbox id
TRIED = "slack:tried"  # per-thread hash: outbox id -> when it was first tried (unix seconds)
THREAD_KEY_SUFFIXES = (TRIED,)
TRIED_TTL_S = 14 * 86_400  # bounded even where the retention sweep does not know this key
LOOKUP_SLACK_S = 120.0  # look this far before the first attempt: the two clocks differ
LOOKUP_PAGES = 5

MAX_ATTEMPTS = 12  # with the backoff below: about five minutes of Slack being down before a dead letter
BASE_DELAY = 0.5

# Web API errors that mean "not now" rather than "never": Slack is busy or down, or the app's token or scopes
# need fixing. Those hit every message alike and all of them go out once it is fixed, so they are retried
# instead of filling the dead letters. Any other error is about the message or its channel (channel_not_found,
# not_in_channel, is_archived, msg_too_long, invalid_blocks, no_text, message_not_found...): never retried.
RETRYABLE_ERRORS = frozenset({
    "ratelimited", "rate_limited", "message_limit_exceeded", "internal_error", "fatal_error", "service_unavailable",
    "request_timeout", "timeout", "not_authed", "invalid_auth", "account_inactive", "token_revoked",
    "token_expired", "no_permission", "missing_scope", "not_allowed_token_type", "team_access_not_granted",
    "ekm_access_denied", "org_login_required", "accesslimited",
})  # fmt: skip


def refused_for_good(status: int, error: str) -> bool:
    """Whether a Web API failure (HTTP status, Slack's error code) means this message will never go out."""
    if status == 429 or status >= 500 or not error:
        return False
    return error not in RETRYABLE_ERRORS


def _failure(method: str, exc: SlackApiError) -> DeliveryFailed | PermanentDeliveryError:
    status = getattr(exc.response, "status_code", 0)
    headers = {str(k).lower(): str(v) for k, v in (getattr(exc.response, "headers", None) or {}).items()}
    retry_after = headers.get("retry-after", "")
    error = str(exc.response.get("error", "")) if isinstance(exc.response.data, dict) else ""
    why = f"slack {method}: HTTP {status} {error}".rstrip()
    if refused_for_good(status, error):
        return PermanentDeliveryError(why)
    return DeliveryFailed(why, float(retry_after) if retry_after.isdigit() else None)


async def _call(method: str, call: Any) -> Any:
    """One Web API call, its failures as DeliveryFailed or PermanentDeliveryError (messages carry no token:
    slack_sdk never puts it there)."""
    try:
        return await call
    except SlackApiError as exc:
        raise _failure(method, exc) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DeliveryFailed(f"slack {method}: {type(exc).__name__}: {exc}") from None


def sender(deps: Deps, client: AsyncWebClient) -> Deliver:
    """The Deliver function for the ``slack`` outbox."""

    async def deliver(msg: Outbound) -> Receipt | None:
        if msg.ref.kind != KIND or not msg.ref.address:
            return None
        channel = msg.ref.address
        thread_ts = (msg.ref.model_extra or {}).get("thread_ts")
        if msg.kind == "approval_update" and msg.approval:
            return await _update_card(deps, client, msg, channel, thread_ts)
        if msg.kind == "text" and msg.text.startswith("Cancelled by"):  # the core's words: only then load the log
            await _cancel_card(deps, client, msg, channel, thread_ts)
        blocks = cards.request_card(msg.approval) if msg.kind == "approval_request" and msg.approval else None
        text = f":warning: {msg.text}" if msg.kind == "error" else msg.text
        return await post_once(deps, client, msg, channel, thread_ts, text=text, blocks=blocks)

    return deliver


def metadata(outbox_id: str) -> dict[str, Any]:
    return {"event_type": METADATA_TYPE, "event_payload": {"outbox_id": outbox_id}}


async def post_once(
    deps: Deps, client: AsyncWebClient, msg: Outbound, channel: str, thread_ts: str | None, *, text: str,
    blocks: list[dict[str, Any]] | None = None,
) -> Receipt:  # fmt: skip
    """chat.postMessage at most once per outbox message: a message tried before is first looked for in Slack."""
    tried = deps.keys.thread_key(msg.thread_id, TRIED)
    first = await deps.redis.hget(tried, msg.id)
    if first is not None:
        try:
            ts = await _find(client, channel, thread_ts, msg.id, since=float(first) - LOOKUP_SLACK_S)
        except PermanentDeliveryError as exc:  # this channel's history cannot be read: a repeat beats a loss
            log.warning("slack: could not look for %s before posting it again (%s)", msg.id, exc.reason)
            ts = None
        if ts is not None:
            log.info("slack: %s was posted by an attempt whose answer was lost; not posting it again", msg.id)
            return Receipt(channel_id=ts)
    else:
        pipe = deps.redis.pipeline(transaction=True)
        pipe.hset(tried, msg.id, f"{time.time():.3f}")
        pipe.expire(tried, TRIED_TTL_S)
        await pipe.execute()
    sent = await _call("chat.postMessage", client.chat_postMessage(
        channel=channel, thread_ts=thread_ts, text=text, blocks=blocks, metadata=metadata(msg.id)))  # fmt: skip
    return Receipt(channel_id=str(sent["ts"]))


async def _find(
    client: AsyncWebClient, channel: str, thread_ts: str | None, outbox_id: str, since: float
) -> str | None:
    """The ts of our message carrying ``outbox_id``, posted since ``since`` (None: not there)."""
    cursor = None
    for _ in range(LOOKUP_PAGES):
        common: dict[str, Any] = {"channel": channel, "oldest": f"{max(0.0, since):.6f}", "limit": 200,
                                  "include_all_metadata": True, "cursor": cursor}  # fmt: skip
        if thread_ts:
            page = await _call("conversations.replies", client.conversations_replies(ts=thread_ts, **common))
        else:
            page = await _call("conversations.history", client.conversations_history(**common))
        for m in page.get("messages") or []:
            if m.get("metadata") == metadata(outbox_id):
                return str(m["ts"])
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            return None
    return None  # not in the newest pages: posting again is the lesser harm than never posting


async def _update_card(
    deps: Deps, client: AsyncWebClient, msg: Outbound, channel: str, thread_ts: str | None
) -> Receipt | None:
    """Replace the card's buttons by the verdict; found through the receipt of the request's message. The card
    then shows the call that ran: the approver's edited arguments, if they edited them."""
    assert msg.approval is not None
    aid = str(msg.approval["id"])
    thread = await threads.load(deps.redis, deps.keys, msg.thread_id)
    request = next((e for e in thread.events if isinstance(e, ApprovalRequested) and e.approval_id == aid), None)
    decided = next((e for e in thread.events if isinstance(e, ApprovalDecided) and e.approval_id == aid), None)
    update = dict(msg.approval)
    args = request.args if request is not None else {}
    if decided is not None and decided.approved and decided.args is not None and decided.args != args:
        args, update["edited"] = decided.args, True
    return await update_card(deps, client, msg, channel, thread_ts, request, args, update)


async def _cancel_card(deps: Deps, client: AsyncWebClient, msg: Outbound, channel: str, thread_ts: str | None) -> None:
    """A thread cancelled while its card waited: the card loses its buttons and says who cancelled it. Done before
    the "Cancelled by" message goes out; chat.update is idempotent, so a retry does it again harmlessly."""
    thread = await threads.load(deps.redis, deps.keys, msg.thread_id)
    cancel = next((e for e in thread.events if e.id == msg.id and isinstance(e, ThreadCancelled)), None)
    if cancel is None:
        return
    before = thread.events[: thread.events.index(cancel)]
    request = next((e for e in reversed(before) if isinstance(e, ApprovalRequested)), None)
    if request is None or any(isinstance(e, ApprovalDecided) and e.approval_id == request.approval_id for e in before):
        return
    try:
        record = await approvals.get(deps.redis, deps.keys, request.approval_id)
    except NotFound:
        return
    if record.state != "cancelled":
        return  # decided first: that decision's own update tells it
    update = {"id": request.approval_id, "cancelled_by": cancel.by or ""}
    await update_card(deps, client, msg, channel, thread_ts, request, request.args, update, post_if_missing=False)


async def update_card(
    deps: Deps, client: AsyncWebClient, msg: Outbound, channel: str, thread_ts: str | None,
    request: ApprovalRequested | None, args: dict[str, Any], update: dict[str, Any], *, post_if_missing: bool = True,
) -> Receipt | None:  # fmt: skip
    ts = None
    if request is not None:
        ts = await deps.redis.hget(deps.keys.receipts(msg.thread_id), f"{KIND}:{request.id}")
    text = cards.verdict(update)
    if request is None or ts is None:  # the card never went out (dead-lettered): say it in the thread instead
        return await post_once(deps, client, msg, channel, thread_ts, text=text) if post_if_missing else None
    blocks = cards.decided_card(request.approval_id, request.tool, args, request.reason, update)
    done = await _call("chat.update", client.chat_update(channel=channel, ts=ts.decode(), text=text, blocks=blocks))
    return Receipt(channel_id=str(done["ts"]))


async def deliver_slack(
    deps: Deps, stop: asyncio.Event, *, settings: SlackSettings | None = None, max_attempts: int = MAX_ATTEMPTS,
    base_delay: float = BASE_DELAY,
) -> None:  # fmt: skip
    """Deliver the ``slack`` outbox until ``stop`` (idle when Slack is not configured).

    One process at a time delivers (a lease), so a thread's messages go out in order and a decision never
    overtakes the card it updates (see OutboxConsumer.run_exclusive).
    """
    settings = settings or SlackSettings.from_env()
    if settings is None:
        await stop.wait()
        return
    consumer = OutboxConsumer(
        deps.redis, deps.keys, KIND, sender(deps, web_client(settings)), consumer="deliverer",
        max_attempts=max_attempts, base_delay=base_delay,
        claim_idle_ms=0,  # only the lease holder reads, so whatever is pending was left by a dead one
    )  # fmt: skip
    await consumer.run_exclusive(stop)
