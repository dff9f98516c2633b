"""Block Kit for approvals: the card with its buttons, the card once decided, and the Reject and Edit modals."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

APPROVE, REJECT, EDIT = "handrail_approve", "handrail_reject", "handrail_edit"  # action ids (button value: approval)
REJECT_VIEW, EDIT_VIEW = "handrail_reject_view", "handrail_edit_view"  # modal callback ids
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"
ARG_PREFIX = "arg:"  # block id of one argument's input in the Edit modal
Blocks = list[dict[str, Any]]


def who(identity: str) -> str:
    """A Slack identity as a mention (``slack:U1`` -> ``<@U1>``); others as they are."""
    return f"<@{identity[6:]}>" if identity.startswith("slack:") else identity


def when(ms: int) -> str:
    """A time shown in each reader's own time zone, with a UTC fallback."""
    import datetime as dt

    utc = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M UTC")
    return f"<!date^{ms // 1000}^{{time}}|{utc}>"


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _cut(text: str, limit: int) -> str:
    """Within Block Kit's length limits: Slack refuses the whole message otherwise."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _details(tool: str, args: Mapping[str, Any], reason: str, approvers: Sequence[str]) -> Blocks:
    fields = [{"type": "mrkdwn", "text": _cut(f"*{k}*\n{_shown(v)}", 2000)} for k, v in args.items()][:10]
    title = _cut(f":raised_hand: Approval needed to run *{tool}*", 3000)
    blocks: Blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": title}}]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    if reason:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"*Why:* {reason}", 3000)}})
    if approvers:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": "Who may decide: " + ", ".join(who(a) for a in approvers)}]})  # fmt: skip
    return blocks


def request_card(approval: Mapping[str, Any]) -> Blocks:
    """What the agent wants to do, who may decide, and the buttons."""
    aid = str(approval["id"])
    blocks = _details(approval["tool"], approval.get("args") or {}, approval.get("reason", ""),
                      approval.get("approvers") or [])  # fmt: skip
    blocks.append({
        "type": "actions",
        "block_id": f"approval:{aid}",
        "elements": [
            {"type": "button", "action_id": APPROVE, "value": aid, "style": "primary",
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": REJECT, "value": aid, "style": "danger",
             "text": {"type": "plain_text", "text": "Reject"}},
            {"type": "button", "action_id": EDIT, "value": aid, "text": {"type": "plain_text", "text": "Edit"}},
        ],
    })  # fmt: skip
    return blocks


def verdict(update: Mapping[str, Any]) -> str:
    """'Approved by <@U1> at 14:02' or 'Rejected by <@U1>: reason'."""
    by = who(str(update.get("by", "")))
    if update.get("approved"):
        return f":white_check_mark: Approved by {by} at {when(int(update.get('at') or 0))}"
    feedback = str(update.get("feedback") or "")
    return f":x: Rejected by {by}" + (f": {feedback}" if feedback else "")


def decided_card(tool: str, args: Mapping[str, Any], reason: str, update: Mapping[str, Any]) -> Blocks:
    """The card after a decision: the same details, the buttons replaced by the verdict."""
    blocks = _details(tool, args, reason, ())
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": verdict(update)}})
    return blocks


def reject_modal(approval_id: str, tool: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": REJECT_VIEW,
        "private_metadata": approval_id,
        "title": {"type": "plain_text", "text": "Reject"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{
            "type": "input", "block_id": REASON_BLOCK,
            "label": {"type": "plain_text", "text": f"Why not run {tool}? The agent is told."},
            "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True, "max_length": 2000},
        }],
    }  # fmt: skip


def edit_modal(approval_id: str, tool: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """One input per argument, prefilled; numbers, lists and objects are typed as JSON."""
    blocks: Blocks = [
        {"type": "input", "block_id": f"{ARG_PREFIX}{name}",
         "label": {"type": "plain_text", "text": name[:2000]},
         "element": {"type": "plain_text_input", "action_id": "value", "initial_value": _shown(value)}}
        for name, value in args.items()
        if len(_shown(value)) <= 3000  # Slack's limit for an input; a longer argument stays as it is
    ]  # fmt: skip
    return {
        "type": "modal",
        "callback_id": EDIT_VIEW,
        "private_metadata": approval_id,
        "title": {"type": "plain_text", "text": "Edit and approve"},
        "submit": {"type": "plain_text", "text": "Approve"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"Approve *{tool}* with these arguments:"}},
                   *blocks],
    }  # fmt: skip


def edited_args(original: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The Edit modal's submitted values back into arguments: text stays text where the original was text."""
    args = dict(original)  # arguments the modal did not show keep their values
    for block_id, inputs in values.items():
        if not block_id.startswith(ARG_PREFIX):
            continue
        name, raw = block_id.removeprefix(ARG_PREFIX), str((inputs.get("value") or {}).get("value") or "")
        if isinstance(original.get(name), str):
            args[name] = raw
        else:
            try:
                args[name] = json.loads(raw)
            except ValueError:
                args[name] = raw  # the tool's schema check says what is wrong with it
    return args
