"""Reading mail safely (any MIME, any charset, any size) and writing Handrail's own mails."""

from __future__ import annotations

import email
import email.policy
import hashlib
import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.utils import format_datetime, formataddr, getaddresses, parseaddr

from mailparser_reply import EmailReplyParser

MAX_TEXT = 20_000  # characters of a body the agent sees
MAX_MAIL = 25_000_000  # bytes of a mail fetched and parsed at all (common servers' limit); the rest is cut
_LANGUAGES = ["en", "de", "fr", "es", "it", "nl"]


@dataclass
class Incoming:
    """What Handrail needs from one received mail."""

    message_id: str
    sender: str  # the From address, lower case ("" when missing or unreadable)
    subject: str
    text: str  # the new text of the mail (quoted history and signature removed)
    in_reply_to: str
    references: list[str]
    recipients: list[str]  # To, Cc, Delivered-To, X-Original-To: where a plus token may be
    automatic: str  # why it looks machine-sent ("" for a person)
    attachments: list[str] = field(default_factory=list)  # "name (type, N bytes)"
    raw: bytes = b""
    notes: list[str] = field(default_factory=list)  # what was cut or could not be read
    truncated: bool = False  # only the beginning of the mail was read (it was over MAX_MAIL)


def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
        return re.sub(r"\s+", " ", str(value)).strip() if value is not None else ""
    except Exception:  # a header the parser cannot decode counts as absent
        return ""


def _ids(value: str) -> list[str]:
    return re.findall(r"<[^<>\s]+>", value)


def automatic_reason(msg: Message, sender: str, own: str) -> str:
    """Why a mail looks sent by a machine (auto-reply, bounce, list): such mail is never answered."""
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = _header(msg, "Precedence").lower()
    if precedence in ("bulk", "list", "junk", "auto_reply"):
        return f"Precedence: {precedence}"
    for name in ("List-Id", "List-Unsubscribe", "X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress"):
        if _header(msg, name):
            return f"{name} header"
    if _header(msg, "Return-Path").replace(" ", "") == "<>":
        return "null Return-Path (a bounce)"
    local = sender.split("@", 1)[0]
    if local in ("mailer-daemon", "postmaster", "noreply", "no-reply") or sender == own:
        return f"sent by {sender}"
    return ""


def parse(raw: bytes, own_address: str, size: int = 0) -> Incoming:
    """Read a mail, whatever state it is in; never raises. CPU-bound on big mail: call it off the event loop.
    ``size``: the whole mail's size, when ``raw`` is only its beginning (the server's copy was fetched in part)."""
    notes: list[str] = []
    truncated = size > len(raw) or len(raw) > MAX_MAIL
    raw = raw[:MAX_MAIL]
    if truncated:
        notes.append(f"the mail was {max(size, len(raw)) / 1e6:.1f} MB; only its first {len(raw) / 1e6:.1f} MB "
                     "were read")  # fmt: skip
    try:
        msg: Message = email.message_from_bytes(raw, policy=email.policy.default)
        _header(msg, "Subject")
    except Exception:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    sender = parseaddr(_header(msg, "From"))[1].lower()
    message_id = (_ids(_header(msg, "Message-ID")) or [""])[0]
    if not message_id:  # no Message-ID: the content itself identifies the mail
        message_id = f"<sha256.{hashlib.sha256(raw).hexdigest()[:32]}@handrail.invalid>"
    recipients = [a.lower() for _, a in getaddresses(
        [_header(msg, h) for h in ("To", "Cc", "Delivered-To", "X-Original-To")]) if a]  # fmt: skip
    text, attachments = _body(msg, notes)
    return Incoming(
        message_id=message_id, sender=sender, subject=_header(msg, "Subject")[:300],
        text=text, in_reply_to=(_ids(_header(msg, "In-Reply-To")) or [""])[0],
        references=_ids(_header(msg, "References")), recipients=recipients,
        automatic=automatic_reason(msg, sender, own_address.lower()), attachments=attachments, raw=raw, notes=notes,
        truncated=truncated,
    )  # fmt: skip


def _decode(part: Message, notes: list[str]) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        notes.append(f"unknown charset {charset!r}; read as UTF-8")
        return payload.decode("utf-8", errors="replace")


def _body(msg: Message, notes: list[str]) -> tuple[str, list[str]]:
    plain: list[str] = []
    htmls: list[str] = []
    attachments: list[str] = []
    try:
        parts = list(msg.walk())
    except Exception:
        notes.append("the MIME structure could not be read")
        parts = []
    for part in parts:
        if part.is_multipart():
            continue
        try:
            ctype = part.get_content_type()
            disposition = (part.get_content_disposition() or "").lower()
            filename = part.get_filename()
        except Exception:
            notes.append("a part could not be read")
            continue
        if disposition == "attachment" or filename or not ctype.startswith("text/"):
            size = len(part.get_payload(decode=True) or b"")
            attachments.append(f"{filename or '(unnamed)'} ({ctype}, {size} bytes)")
        elif ctype == "text/plain":
            plain.append(_decode(part, notes))
        elif ctype == "text/html":
            htmls.append(_decode(part, notes))
    body = "\n".join(plain) if plain else "\n".join(html_to_text(h[: MAX_TEXT * 20]) for h in htmls)
    text = reply_text(body[: MAX_TEXT * 5])  # the reply parser's regexes need not see what would be cut anyway
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
        notes.append(f"the text was cut at {MAX_TEXT} characters")
    return text, attachments


def html_to_text(source: str) -> str:
    """Enough HTML to text for a reply: block elements become line breaks, tags go, entities are decoded."""
    source = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", "", source)
    source = re.sub(r"(?i)<br\s*/?>|</(p|div|li|tr|h\d|blockquote)>", "\n", source)
    return html.unescape(re.sub(r"<[^>]+>", "", source))


def reply_text(body: str) -> str:
    """The new text of a mail: quoted history and signature removed by mail-parser-reply."""
    body = body.replace("\r\n", "\n").strip()
    if not body:
        return ""
    try:
        text = EmailReplyParser(languages=_LANGUAGES).parse_reply(text=body)
    except Exception:  # the library is heuristic; never let it cost a mail
        text = body
    return (text or body).strip()


def compose(
    *, sender: str, to: list[str], subject: str, text: str, message_id: str, reply_to: str,
    in_reply_to: str = "", references: list[str] | None = None,
) -> EmailMessage:  # fmt: skip
    """One of Handrail's mails: threaded, answerable at its plus address, and marked automatic."""
    msg = EmailMessage()
    msg["From"] = formataddr(("Handrail", sender))
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(datetime.now(UTC))  # RFC 5322 requires it
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    msg["Reply-To"] = reply_to
    msg["Auto-Submitted"] = "auto-generated"  # so well-behaved auto-responders never answer us
    msg.set_content(text)
    return msg
