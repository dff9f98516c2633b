"""What a signed Slack request must look like before Bolt sees it: a body the handlers can read without guessing.

A signed request is from Slack (or from someone holding the signing secret), but its shape is still checked: a
field missing or of the wrong type answers 400 with the reason and records nothing, instead of failing inside a
handler (500) or finding no handler (404). Pure code: a body in, the reason it is refused (or None) out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from channels.slack import cards

COMMAND = "/handrail"
MESSAGE_EVENTS = frozenset({"message", "app_mention"})  # the events whose fields the handlers read
ACTIONS = frozenset({cards.APPROVE, cards.REJECT, cards.EDIT})
VIEWS = frozenset({cards.REJECT_VIEW, cards.EDIT_VIEW})


def _str(doc: Mapping[str, Any], path: Sequence[str], *, required: bool = True, nonempty: bool = True) -> str | None:
    """Why ``doc[path...]`` is not a string (None: it is, or it is absent and optional)."""
    here: Any = doc
    for i, key in enumerate(path):
        if not isinstance(here, Mapping):
            return f"'{'.'.join(path[:i])}' must be an object"
        if key not in here or here[key] is None:
            return f"'{'.'.join(path)}' is missing" if required else None
        here = here[key]
    if not isinstance(here, str):
        return f"'{'.'.join(path)}' must be a string"
    if nonempty and not here:
        return f"'{'.'.join(path)}' is empty"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def event_problem(doc: Mapping[str, Any]) -> str | None:
    kind = doc.get("type")
    if kind == "url_verification":
        return _str(doc, ["challenge"], nonempty=False)
    if kind != "event_callback":
        return f"a JSON body of type {str(kind)[:40]!r} is not handled by Handrail"
    event = doc.get("event")
    if not isinstance(event, Mapping):
        return "an event_callback needs an 'event' object"
    why = _first(_str(doc, ["event", "type"]), _str(doc, ["team_id"], required=False))
    if why or event["type"] not in MESSAGE_EVENTS:
        return why
    why = _first(
        *(_str(doc, ["event", name]) for name in ("channel", "ts")),
        *(_str(doc, ["event", name], required=False) for name in ("thread_ts", "user", "team", "subtype", "user_team")),
        _str(doc, ["event", "channel_type"], required=False),
        *(_str(doc, ["event", name], required=False, nonempty=False) for name in ("text", "bot_id")),
    )
    if why is None and event["type"] == "app_mention" and "user" not in event:
        return "'event.user' is missing"
    return why


def interaction_problem(payload: Mapping[str, Any]) -> str | None:
    kind = payload["type"]
    who = _first(_str(payload, ["user", "id"]), _str(payload, ["user", "team_id"], required=False),
                 _str(payload, ["team", "id"], required=False))  # fmt: skip
    if kind == "block_actions":
        actions = payload.get("actions")
        if not isinstance(actions, list) or not actions or not isinstance(actions[0], Mapping):
            return "'actions' must be a list of at least one action object"
        why = _first(who, _str(actions[0], ["action_id"]))
        if why:
            return "actions[0]: " + why if why.startswith("'action_id'") else why
        if actions[0]["action_id"] not in ACTIONS:
            return f"action {actions[0]['action_id']!r} is not one of Handrail's"
        return _first(
            _str(actions[0], ["value"]) and "'actions[0].value' must be the approval id (a string)",
            _str(payload, ["channel", "id"]), _str(payload, ["trigger_id"]),
            _str(payload, ["message", "ts"], required=False), _str(payload, ["message", "thread_ts"], required=False),
        )  # fmt: skip
    if kind == "view_submission":
        why = _first(who, _str(payload, ["view", "callback_id"]), _str(payload, ["view", "type"]))  # Bolt reads type
        if why:
            return why
        view = payload["view"]
        if view["callback_id"] not in VIEWS:
            return f"view {view['callback_id']!r} is not one of Handrail's"
        values = (view.get("state") or {}).get("values", {}) if isinstance(view.get("state"), Mapping) else None
        if not isinstance(values, Mapping) or not all(isinstance(v, Mapping) for v in values.values()):
            return "'view.state.values' must be an object of objects"
        for block, inputs in values.items():
            for name, field in inputs.items():
                if not isinstance(field, Mapping) or _str(field, ["value"], required=False, nonempty=False):
                    return f"'view.state.values.{block}.{name}' must be an input with a text value"
        return _str(view, ["private_metadata"]) and "'view.private_metadata' must be the approval id (a string)"
    return f"interactivity of type {kind!r} is not handled by Handrail"


def command_problem(form: Mapping[str, list[str]]) -> str | None:
    command = form.get("command", [""])[0]
    if command != COMMAND:
        return f"slash command {command!r} is not handled by Handrail (only {COMMAND})"
    for name in ("user_id", "team_id"):
        if not form.get(name, [""])[0]:
            return f"'{name}' is missing"
    return None


def _loads(text: str) -> Any:
    """JSON, refusing a lone surrogate ("\\ud800"): it could not be stored or sent on."""
    doc = json.loads(text)
    json.dumps(doc, ensure_ascii=False).encode()  # UnicodeEncodeError is a ValueError
    return doc


def problem(content_type: str, body: bytes) -> str | None:
    """Why this signed body cannot be handled (None: it can)."""
    try:
        text = body.decode()
        if content_type.startswith("application/json"):
            doc = _loads(text)
            if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
                return "a JSON body must be an object with a 'type'"
            return event_problem(doc)
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = parse_qs(text, strict_parsing=False)
            if "payload" in form:
                payload = _loads(form["payload"][0])
                if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
                    return "'payload' must be a JSON object with a 'type'"
                return interaction_problem(payload)
            if "ssl_check" in form:
                return None
            if "command" in form:
                return command_problem(form)
            return "a form body needs 'payload' (interactivity) or 'command' (a slash command)"
    except (ValueError, RecursionError) as exc:  # ValueError includes bad UTF-8 and bad JSON
        return f"body is not valid: {exc}"
    return f"unsupported Content-Type {content_type or '(none)'!r}"
