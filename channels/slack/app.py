"""Slack inbound: the Bolt app (Events API, buttons, modals, /handrail) and its one HTTP route.

Every message Slack sends us becomes an event on the inbound stream before Slack is answered (Bolt runs with
``process_before_response``), so a crash before the answer makes Slack retry, and the retry is recognised by its
idempotency key. User ids always come from the body Slack signed, never from a button's value.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import approvals, control, threads
from bot.agent import ApprovalPolicy
from bot.errors import HandrailError
from bot.events import ChannelRef
from bot.runtime import Deps
from bot.threads import Status
from channels.slack import cards, payloads
from channels.slack.identity import GuestCache, Person, identity
from channels.slack.settings import SlackSettings

log = logging.getLogger(__name__)

KIND = "slack"
TOLERANCE = 300  # seconds: Slack's own rule for how old a signed request may be
_SUBTYPES = frozenset({None, "thread_broadcast", "file_share"})  # message subtypes a person writes


def thread_id(team: str, channel: str, thread_ts: str) -> str:
    """A Slack thread is a Handrail thread: the id follows from where it lives."""
    return f"slack-{team}-{channel}-{thread_ts}"


def web_client(settings: SlackSettings) -> AsyncWebClient:
    # slack_sdk annotates the timeout as int, but hands it to aiohttp's ClientTimeout, which takes fractions
    timeout: Any = settings.api_timeout
    return AsyncWebClient(token=settings.bot_token, base_url=settings.api_url, timeout=timeout)


# -- signatures, checked before Bolt sees the request (payloads.py checks the shape next) ---------------------


def check_signature(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str | None:
    """Why the request is not from Slack (None: it is). v0=HMAC_SHA256(secret, "v0:{timestamp}:{body}")."""
    stamp, given = headers.get("x-slack-request-timestamp", ""), headers.get("x-slack-signature", "")
    if not stamp or not given:
        return "missing X-Slack-Request-Timestamp or X-Slack-Signature header"
    if not (stamp.isascii() and stamp.isdigit()):
        return "X-Slack-Request-Timestamp is not unix seconds"
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE:
        return f"X-Slack-Request-Timestamp is more than {TOLERANCE} s off this server's clock"
    expected = "v0=" + hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.encode()):
        return "signature does not match"
    return None


# -- the Bolt app ----------------------------------------------------------------------------------------------


class SlackInbound:
    """What each Slack request turns into on the inbound stream."""

    def __init__(self, deps: Deps, settings: SlackSettings, client: AsyncWebClient | None = None) -> None:
        self.deps, self.settings = deps, settings
        self._installed: str | None = None
        self._guests = GuestCache()
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = AsyncApp(
            client=client or web_client(settings),
            signing_secret=settings.signing_secret,
            process_before_response=True,  # record first, answer Slack after
            logger=logging.getLogger("channels.slack.bolt"),
        )
        self._register()

    def _register(self) -> None:
        app = self.app
        app.event("app_mention")(self.on_mention)
        app.event("message")(self.on_message)
        app.event(re.compile(".*"))(self.on_other_event)  # last: listeners are tried in order
        app.action(cards.APPROVE)(self.on_approve)
        app.action(cards.REJECT)(self.on_open_modal)
        app.action(cards.EDIT)(self.on_open_modal)
        app.view(cards.REJECT_VIEW)(self.on_reject)
        app.view(cards.EDIT_VIEW)(self.on_edit)
        app.command("/handrail")(self.on_command)

    # -- messages

    async def on_mention(self, ack: Any, body: dict[str, Any], event: dict[str, Any], context: Any) -> None:
        await self._message(body, event, context, start=True)
        await ack()

    async def on_message(self, ack: Any, body: dict[str, Any], event: dict[str, Any], context: Any) -> None:
        bot_user = context.get("bot_user_id") or ""
        if event.get("channel_type") == "im":
            await self._message(body, event, context, start=True)
        elif f"<@{bot_user}>" not in event.get("text", ""):  # a mention arrives as app_mention too
            await self._message(body, event, context, start=False)  # a reply in a thread we are part of
        await ack()

    async def on_other_event(self, ack: Any, event: dict[str, Any]) -> None:
        log.info("slack: ignored an event of type %r (no handler)", event.get("type"))
        await ack()

    async def _message(self, body: dict[str, Any], event: dict[str, Any], context: Any, *, start: bool) -> None:
        if event.get("bot_id") or event.get("subtype") not in _SUBTYPES or not event.get("user"):
            log.debug("slack: ignored a bot's or system message (%s)", event.get("subtype"))
            return
        bot_user = context.get("bot_user_id") or ""
        team = str(event.get("team") or body.get("team_id") or "")
        channel, ts = str(event["channel"]), str(event["ts"])
        thread_ts = str(event.get("thread_ts") or ts)
        text = re.sub(rf"<@{re.escape(bot_user)}>\s*", "", str(event.get("text", ""))).strip() if bot_user else ""
        text = text or str(event.get("text", "")).strip()
        tid = thread_id(team, channel, thread_ts)
        speaker = identity(str(event.get("user_team") or team), str(event["user"]))  # their own workspace
        ref = ChannelRef.model_validate(
            {"kind": KIND, "address": channel, "user": speaker, "team": team, "thread_ts": thread_ts}
        )  # fmt: skip
        # keyed by the message, not the event: a Slack retry and the app_mention + message pair are one message
        key = f"slack:{team}:{channel}:{ts}"
        # launch, continue (an answer if the thread waits on a human), or ignore a thread we were never part of;
        # a reply that arrives before its thread's launch is applied still counts
        deps = self.deps
        thread = await threads.load(deps.redis, deps.keys, tid)
        if await control.receive(deps, tid, text, ref, key=key, start=start) is None:
            return
        if thread.status is Status.WAITING_APPROVAL:  # recorded as context; the sender hears it was
            self._later(self._noted(thread, channel, str(event["user"]), thread_ts))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Off the request's path: Slack wants its answer within three seconds."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _noted(self, thread: threads.Thread, channel: str, user: str, thread_ts: str) -> None:
        """Tell whoever wrote in a thread whose card waits what becomes of their message (only they see it)."""
        request = thread.open_approval()
        tool = f"*{cards.escape(request.tool)}*" if request is not None else "the pending call"
        text = (f"Noted. This thread waits for a decision on {tool} (the card above); the agent reads your message "
                "once it is approved or rejected.")  # fmt: skip
        try:
            await self.app.client.chat_postEphemeral(channel=channel, user=user, text=text, thread_ts=thread_ts)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:  # the message itself is recorded
            log.warning("slack: could not tell %s their message was noted: %s", user, exc)

    # -- approvals

    async def on_approve(self, ack: Any, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        approval_id = str(body["actions"][0]["value"])
        problem, record, by = await self._may_decide(approval_id, body)
        if record is None or problem:
            await self._ephemeral(client, body, problem or "This approval no longer exists.")
            return
        try:
            outcome = await control.decide(self.deps, approval_id, by=by, approved=True)
        except HandrailError as exc:
            await self._ephemeral(client, body, str(exc))
            return
        if outcome.result != "ok":  # the card itself is updated by the outbox, from the decision event
            await self._ephemeral(client, body, refusal(outcome))

    async def on_open_modal(self, ack: Any, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        action = body["actions"][0]
        approval_id = str(action["value"])
        problem, record, _ = await self._may_decide(approval_id, body)
        if record is None or problem:
            await self._ephemeral(client, body, problem or "This approval no longer exists.")
            return
        if action["action_id"] == cards.REJECT:
            view = cards.reject_modal(approval_id, record.tool)
        else:
            view = cards.edit_modal(approval_id, record.tool, record.args)
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    async def on_reject(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        approval_id = str(view["private_metadata"])
        values = view.get("state", {}).get("values", {})
        reason = str((values.get(cards.REASON_BLOCK, {}).get(cards.REASON_INPUT) or {}).get("value") or "")
        problem, record, by = await self._may_decide(approval_id, body)
        if record is None or problem:
            gone = problem or "This approval no longer exists."
            await ack(response_action="errors", errors={cards.REASON_BLOCK: gone})
            return
        outcome = await control.decide(self.deps, approval_id, by=by, approved=False, feedback=reason)
        if outcome.result == "ok":
            await ack()
        else:
            await ack(response_action="errors", errors={cards.REASON_BLOCK: refusal(outcome)})

    async def on_edit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        approval_id = str(view["private_metadata"])
        values = view.get("state", {}).get("values", {})
        shown = [b.removeprefix(cards.ARG_PREFIX) for b in values if b.startswith(cards.ARG_PREFIX)]
        first = next(iter(values), cards.ARG_PREFIX)
        problem, record, by = await self._may_decide(approval_id, body)
        if record is None or problem:
            await ack(response_action="errors", errors={first: problem or "This approval no longer exists."})
            return
        args = cards.edited_args(record.args, values)
        invalid = await self._invalid(record, args)
        if invalid:  # said on the inputs concerned; decide would refuse them as one message
            await ack(response_action="errors", errors=cards.field_errors(invalid, shown, first))
            return
        try:
            outcome = await control.decide(self.deps, approval_id, by=by, approved=True, args=args)
        except HandrailError as exc:
            await ack(response_action="errors", errors={first: str(exc)[: cards.ERROR_MAX]})
            return
        if outcome.result == "ok":
            await ack()
        else:
            await ack(response_action="errors", errors={first: refusal(outcome)})

    # -- who is asking

    async def installed_team(self) -> str:
        """The workspace the app is installed in (auth.test's team_id), asked once."""
        if self._installed is None:
            try:
                self._installed = str((await self.app.client.auth_test()).get("team_id") or "")
            except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("slack: auth.test failed: %s", exc)
                raise HandrailError("Slack could not tell who you are just now; try again in a moment.") from None
        return self._installed

    async def person(self, team: str, user: str) -> Person:
        """The user as checked against the installation; a member's guest status comes from users.info."""
        installed = await self.installed_team()
        guest = False
        if team == installed:
            known = self._guests.get(user)
            if known is None:
                try:
                    info = (await self.app.client.users_info(user=user)).get("user") or {}
                    known = bool(info.get("is_restricted") or info.get("is_ultra_restricted"))
                    self._guests.put(user, known)
                except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:  # not cached: asked again next time
                    log.warning("slack: users.info failed for %s (%s); treated as a guest for now", user, exc)
                    known = True
            guest = known
        return Person(team, user, installed, guest)

    async def requester(self, body: dict[str, Any]) -> Person:
        """Who sent an interaction: their own workspace (user.team_id), else the request's."""
        user = body["user"]
        return await self.person(str(user.get("team_id") or (body.get("team") or {}).get("id") or ""), str(user["id"]))

    async def _may_decide(
        self, approval_id: str, body: dict[str, Any]
    ) -> tuple[str, approvals.ApprovalRecord | None, str]:
        """The name the clicker decides under, or why they cannot (checked before a modal opens, so nobody types
        a reason that cannot count; decide checks again, in one place)."""
        try:
            record = await approvals.get(self.deps.redis, self.deps.keys, approval_id)
        except HandrailError:
            return "", None, ""
        if record.state != "pending":
            return refusal(approvals.Outcome("decided", record.state, record.by, record.at)), record, ""
        try:
            who = await self.requester(body)
        except HandrailError as exc:
            return str(exc), record, ""
        name = who.name_in(record.approvers, allow_guests=self.settings.allow_guests)
        if name is None:
            why = "you are a guest in this workspace" if who.guest else "you belong to another workspace"
            return f"You can't approve this: {why}, and only its approvers named in the configuration may.", record, ""
        if not ApprovalPolicy(record.approvers).allows(name):
            return refusal(approvals.Outcome("forbidden")), record, ""
        return "", record, name

    async def _invalid(self, record: approvals.ApprovalRecord, args: dict[str, Any]) -> list[dict[str, Any]]:
        """What the tool's schema finds wrong with the edited arguments (decide checks them again)."""
        thread = await threads.get(self.deps.redis, self.deps.keys, record.thread_id)
        agent = self.deps.agents.agents.get(thread.agent)
        tool = agent.tools.get(record.tool) if agent is not None else None
        if tool is None:
            return []  # decide says why it cannot approve edited arguments
        try:
            tool.validate(args)
        except ValidationError as exc:
            return [dict(e) for e in exc.errors(include_url=False, include_input=False)]
        return []

    async def _ephemeral(self, client: AsyncWebClient, body: dict[str, Any], text: str) -> None:
        """Only the clicker sees it."""
        message = body.get("message") or {}
        await client.chat_postEphemeral(
            channel=str(body["channel"]["id"]), user=str(body["user"]["id"]), text=text,
            thread_ts=message.get("thread_ts") or message.get("ts"),
        )  # fmt: skip

    # -- /handrail

    async def on_command(self, ack: Any, command: dict[str, Any]) -> None:
        try:
            me = await self.person(str(command.get("user_team_id") or command["team_id"]), str(command["user_id"]))
        except HandrailError as exc:
            await ack(text=str(exc))
            return
        word = str(command.get("text") or "").strip().lower()
        if word in ("", "approvals"):
            mine = [a for a in await approvals.pending(self.deps.redis, self.deps.keys)
                    if (name := me.name_in(a.approvers, allow_guests=self.settings.allow_guests))
                    and ApprovalPolicy(a.approvers).allows(name)]  # fmt: skip
            lines = [f"• *{cards.escape(a.tool)}* `{cards.escape(json.dumps(a.args, ensure_ascii=False))}` "
                     f"(thread `{a.thread_id}`, approval `{a.id}`)" for a in mine]  # fmt: skip
            text = "Waiting for your decision:\n" + "\n".join(lines) if lines else "Nothing is waiting for you."
        elif word == "threads":
            rows = await self._visible_threads(me)
            lines = [f"• `{r.id}` {r.agent}: {r.status} ({r.events} events)" for r in rows]
            whose = "Recent Slack threads" if self._sees_all(me) else "Your recent Slack threads"
            text = f"{whose}:\n" + "\n".join(lines) if lines else "No Slack threads you may see."
        else:
            text = "Usage: `/handrail` or `/handrail approvals` (what waits for you), `/handrail threads`."
        if len(text) > 3000:  # what fits, and where the rest is
            text = text[: 3000 - 120].rsplit("\n", 1)[0] + "\n…and more: `handrail approvals list` shows them all."
        await ack(text=text)

    def _sees_all(self, me: Person) -> bool:
        """Admins (SLACK_ADMINS) and approvers named in the configuration see every Slack thread."""
        if not me.member and not (me.guest and self.settings.allow_guests):
            return False
        named = set(self.settings.admins)
        for agent in self.deps.agents.agents.values():
            for policy in agent.approvals.values():
                named.update(policy.approvers)
        return any(n in named for n in me.names())

    async def _visible_threads(self, me: Person, limit: int = 15) -> list[control.Summary]:
        """The recent Slack threads this caller may see: all of them for admins and approvers, else their own."""
        everything = self._sees_all(me)
        names = set(me.names())
        out: list[control.Summary] = []
        for tid in await threads.recent_ids(self.deps.redis, self.deps.keys, limit=200):
            if not tid.startswith("slack-"):
                continue
            t = await threads.load(self.deps.redis, self.deps.keys, tid)
            if not t.events:
                continue
            started_by = next((str(getattr(e, "user", "")) for e in t.events if e.type == "message.received"), "")
            if everything or started_by in names:
                out.append(control.Summary(t.id, t.agent, t.status, len(t.events), t.events[-1].at))
            if len(out) >= limit:
                break
        return out


def refusal(outcome: approvals.Outcome) -> str:
    if outcome.result == "forbidden":
        return "You can't approve this: you are not one of its approvers."
    if outcome.result == "decided":
        by = f" by {cards.who(outcome.by)}" if outcome.by else ""
        return f"Already decided: {outcome.state}{by} at {cards.when(outcome.at)}."
    if outcome.result == "missing":
        return "This approval no longer exists."
    return outcome.message


def router(deps: Deps, settings: SlackSettings) -> APIRouter:
    """POST /slack/events: Events API, interactivity and slash commands at one request URL."""
    inbound = SlackInbound(deps, settings)
    handler = AsyncSlackRequestHandler(inbound.app)
    api = APIRouter(tags=["slack"])

    @api.post("/slack/events", include_in_schema=False)
    async def slack_events(request: Request) -> Response:
        body = await request.body()
        why = check_signature(settings.signing_secret, request.headers, body)
        if why is not None:
            log.warning("slack: refused a request: %s", why)
            return JSONResponse({"detail": why}, status_code=401)
        why = payloads.problem(request.headers.get("content-type", ""), body)
        if why is not None:
            log.warning("slack: refused a signed request: %s", why)
            return JSONResponse({"detail": why}, status_code=400)
        return await handler.handle(request)

    return api
