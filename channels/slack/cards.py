"""Block Kit for approvals: the card with its buttons, the card once decided, and the Reject and Edit modals.

The card is what an approver consents to, so it shows the exact call: every text the model wrote is escaped as
Slack asks (``&``, ``<``, ``>``), so a link or ``<!channel>`` shows as typed and pings nobody; values are shown as
code; and nothing is cut silently. Block Kit's limits (3,000 characters a section, 50 blocks a message) are met by
cutting with a note that says what is not shown and where the full call is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

APPROVE, REJECT, EDIT = "handrail_approve", "handrail_reject", "handrail_edit"  # action ids (button value: approval)
REJECT_VIEW, EDIT_VIEW = "handrail_reject_view", "handrail_edit_view"  # modal callback ids
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"
ARG_PREFIX = "arg:"  # block id of one argument's input in the Edit modal
Blocks = list[dict[str, Any]]

SECTION_MAX = 3000  # Block Kit: the text of one section
MESSAGE_BLOCKS_MAX = 50  # Block Kit: blocks in one message
CARD_ARGS_CHARS = 12_000  # arguments' text on one card: a longer message is refused (msg_too_long)
ARG_VALUE_MAX = 2600  # one value's shown text, leaving room in its section for the name and a note
NAME_MAX = 150
MODAL_BLOCKS_MAX = 100  # Block Kit: blocks in one modal
INPUT_MAX = 3000  # Block Kit: a plain_text_input's initial value
LABEL_MAX = 2000
ERROR_MAX = 300


def who(identity: str) -> str:
    """A Slack identity as a mention (``slack:T1:U1`` or ``slack:U1`` -> ``<@U1>``); others escaped as they are."""
    if identity.startswith("slack:"):
        return f"<@{identity.rsplit(':', 1)[1]}>"
    return escape(identity)


def when(ms: int) -> str:
    """A time shown in each reader's own time zone, with a UTC fallback."""
    import datetime as dt

    utc = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%H:%M UTC")
    return f"<!date^{ms // 1000}^{{time}}|{utc}>"


def escape(text: str) -> str:
    """Slack's escaping: the only three characters its markup gives meaning to."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def fit(text: str, limit: int) -> tuple[str, bool]:
    """The escaped ``text`` within ``limit`` characters, and whether it had to be cut (never inside an escape)."""
    out: list[str] = []
    size = 0
    for ch in text:
        piece = escape(ch)
        if size + len(piece) > limit:
            return "".join(out), True
        out.append(piece)
        size += len(piece)
    return "".join(out), False


def code(escaped: str) -> str:
    """A value as a code block. Slack has no escape for backticks, so a zero-width space keeps a value's own
    backticks from closing the block early (they still show as typed)."""
    return "```" + escaped.replace("`", "`\u200b") + "```"


def full_call(approval_id: str) -> str:
    return f"The full call: `handrail approvals list`, or GET /api/v1/approvals/{escape(approval_id)}."


def _mrkdwn(text: str) -> dict[str, Any]:
    # verbatim: Slack links no bare URL or #channel in it on its own
    return {"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": True}}


@dataclass(frozen=True)
class Shown:
    blocks: Blocks
    hidden: int  # arguments not on the card
    cut: tuple[str, ...]  # arguments whose value was cut


def arguments(args: Mapping[str, Any], max_blocks: int) -> Shown:
    """One section per argument, name in bold and value as code, within the card's budget."""
    blocks: Blocks = []
    cut: list[str] = []
    budget = CARD_ARGS_CHARS
    for i, (name, value) in enumerate(args.items()):
        if len(blocks) >= max_blocks or budget <= 0:
            return Shown(blocks, len(args) - i, tuple(cut))
        label, _ = fit(str(name), NAME_MAX)
        raw = _shown(value)
        shown, was_cut = fit(raw, min(ARG_VALUE_MAX, budget))
        note = f"\n_Value cut: {len(shown):,} of {len(escape(raw)):,} characters shown._" if was_cut else ""
        blocks.append(_mrkdwn(f"*{label}*\n{code(shown)}{note}"))
        budget -= len(shown)
        if was_cut:
            cut.append(str(name))
    return Shown(blocks, 0, tuple(cut))


def _details(approval_id: str, tool: str, args: Mapping[str, Any], reason: str, approvers: Sequence[str],
             *, title: str, room: int) -> Blocks:  # fmt: skip
    """Title, every argument that fits in ``room`` blocks, what was not shown, the agent's reason, who decides."""
    blocks: Blocks = [_mrkdwn(fit(f"{title} *{escape(tool)}*", SECTION_MAX)[0])]
    tail: Blocks = []
    if reason:
        said, was_cut = fit(reason, SECTION_MAX - 200)
        tail.append(_mrkdwn(f"*Why (the agent's words):*\n{said}" + ("…\n_The reason was cut._" if was_cut else "")))
    if approvers:
        deciders = "Who may decide: " + ", ".join(who(a) for a in approvers[:50])  # each escaped by who()
        tail.append({"type": "context", "elements": [{"type": "mrkdwn", "text": deciders[:SECTION_MAX]}]})
    shown = arguments(args, room - len(blocks) - len(tail) - 1)
    blocks.extend(shown.blocks)
    if shown.hidden or shown.cut:
        missing = []
        if shown.hidden:
            missing.append(f"{shown.hidden} more argument{'s' if shown.hidden != 1 else ''} not shown")
        if shown.cut:
            missing.append("a value cut: " + ", ".join(f"*{fit(n, NAME_MAX)[0]}*" for n in shown.cut[:10]))
        blocks.append(_mrkdwn(fit(":warning: " + "; ".join(missing) + ". " + full_call(approval_id), SECTION_MAX)[0]))
    return blocks + tail


def request_card(approval: Mapping[str, Any]) -> Blocks:
    """What the agent wants to do, who may decide, and the buttons."""
    aid = str(approval["id"])
    blocks = _details(aid, str(approval["tool"]), approval.get("args") or {}, str(approval.get("reason") or ""),
                      approval.get("approvers") or [], title=":raised_hand: Approval needed to run",
                      room=MESSAGE_BLOCKS_MAX - 1)  # fmt: skip
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
    """'Approved by <@U1> at 14:02', 'Rejected by <@U1>: reason' or 'Cancelled by …', within one section."""
    by = who(str(update.get("by") or "")) or "an operator"
    if update.get("cancelled_by") is not None:
        return f":no_entry_sign: Cancelled by {who(str(update['cancelled_by'])) or 'an operator'}; nothing ran."
    if update.get("cancelled"):  # decided, but a cancel got to the thread first
        state = "Approved" if update.get("approved") else "Rejected"
        return f":no_entry_sign: {state} by {by}, but the thread was cancelled first; nothing ran."
    if update.get("expired"):
        why = escape(str(update.get("feedback") or "nobody decided in time"))
        return f":hourglass: Expired at {when(int(update.get('at') or 0))}: {why}; nothing ran."
    if update.get("approved"):
        edited = " with edited arguments" if update.get("edited") else ""
        return f":white_check_mark: Approved by {by}{edited} at {when(int(update.get('at') or 0))}"
    head = f":x: Rejected by {by}"
    feedback = str(update.get("feedback") or "")
    if not feedback:
        return head
    said, was_cut = fit(feedback, SECTION_MAX - len(head) - 120)
    return f"{head}: {said}" + ("…\n_The reason was cut; the agent was given all of it._" if was_cut else "")


def decided_card(approval_id: str, tool: str, args: Mapping[str, Any], reason: str,
                 update: Mapping[str, Any]) -> Blocks:  # fmt: skip
    """The card after a decision: the call that ran (the edited one, if edited), the buttons replaced by the verdict."""
    title = ":pencil2: Edited call to" if update.get("edited") else ":raised_hand: Call to"
    blocks = _details(approval_id, tool, args, reason, (), title=title, room=MESSAGE_BLOCKS_MAX - 1)
    blocks.append(_mrkdwn(verdict(update)) | {"block_id": "verdict"})
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
            "label": {"type": "plain_text", "text": f"Why not run {tool}? The agent is told."[:LABEL_MAX]},
            "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True, "max_length": 2000},
        }],
    }  # fmt: skip


def edit_modal(approval_id: str, tool: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """One input per argument, prefilled; numbers, lists and objects are typed as JSON. An argument too long for
    an input is listed too, and says it keeps its value."""
    blocks: Blocks = [_mrkdwn(fit(f"Approve *{escape(tool)}* with these arguments:", SECTION_MAX)[0])]
    items = list(args.items())
    room = MODAL_BLOCKS_MAX - 2  # the heading, and a note if some do not fit
    for name, value in items[:room]:
        text = _shown(value)
        if len(text) > INPUT_MAX:
            blocks.append(_mrkdwn(f"*{fit(name, NAME_MAX)[0]}*: {len(text):,} characters, too long to edit here; "
                                  "it keeps its value."))  # fmt: skip
            continue
        blocks.append({
            "type": "input", "block_id": f"{ARG_PREFIX}{name}",
            "label": {"type": "plain_text", "text": name[:LABEL_MAX]},
            "element": {"type": "plain_text_input", "action_id": "value", "initial_value": text,
                        "multiline": len(text) > 80 or "\n" in text},
        })  # fmt: skip
    if len(items) > room:
        blocks.append(_mrkdwn(f"{len(items) - room} more arguments keep their values. {full_call(approval_id)}"))
    return {
        "type": "modal",
        "callback_id": EDIT_VIEW,
        "private_metadata": approval_id,
        "title": {"type": "plain_text", "text": "Edit and approve"},
        "submit": {"type": "plain_text", "text": "Approve"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


def edited_args(original: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The Edit modal's submitted values back into arguments: text stays text where the original was text."""
    args = dict(original)  # arguments the modal did not show keep their values
    for block_id, inputs in values.items():
        if not block_id.startswith(ARG_PREFIX) or not isinstance(inputs, dict):
            continue
        name = block_id.removeprefix(ARG_PREFIX)
        if name not in original:
            continue  # only the call's own arguments can be edited
        field = inputs.get("value")
        raw = str((field.get("value") if isinstance(field, dict) else None) or "")
        if isinstance(original.get(name), str):
            args[name] = raw
        else:
            try:
                args[name] = json.loads(raw)
            except ValueError:
                args[name] = raw  # the tool's schema check says what is wrong with it
    return args


def field_errors(problems: Sequence[Mapping[str, Any]], shown: Sequence[str], fallback: str) -> dict[str, str]:
    """Pydantic's errors as words on the Edit modal's inputs they concern (others on ``fallback``)."""
    errors: dict[str, list[str]] = {}
    for p in problems:
        loc = [str(x) for x in p.get("loc") or ()]
        name = loc[0] if loc else ""
        block = f"{ARG_PREFIX}{name}" if name in shown else fallback
        where = " → ".join(loc[1:] if block != fallback else loc)
        msg = str(p.get("msg") or "is not valid")
        errors.setdefault(block, []).append(f"{where}: {msg}" if where else msg)
    return {block: "; ".join(msgs)[:ERROR_MAX] for block, msgs in errors.items()}
