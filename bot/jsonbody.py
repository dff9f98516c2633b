"""Request bodies as JSON, strictly: UTF-8 only, and no lone UTF-16 surrogates (Redis and every channel need text
that encodes). Pure code; the web routes turn ``BadJSON`` into a 400/422 with its reason."""

from __future__ import annotations

import json
from typing import Any


class BadJSON(json.JSONDecodeError):
    """A body that is not strict JSON; a JSONDecodeError so FastAPI answers it as 422 ``json_invalid``."""

    def __init__(self, reason: str, doc: str = "", pos: int = 0) -> None:
        super().__init__(reason, doc, pos)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def parse(body: bytes) -> Any:
    """The JSON value of ``body``; BadJSON (with the reason) if it is not UTF-8, not JSON, or holds a lone surrogate."""
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would also guess UTF-16/32: the API speaks UTF-8 only
    except UnicodeDecodeError as exc:
        raise BadJSON(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadJSON(f"body is not JSON: {exc}", exc.doc, exc.pos) from None
    except RecursionError:
        raise BadJSON("body is not JSON: nested too deeply") from None
    where = _surrogate_at(value)
    if where is not None:
        raise BadJSON(f"lone UTF-16 surrogate in a JSON string at {where or '/'} (not valid Unicode text)")
    return value


def _surrogate_at(value: Any) -> str | None:
    """The JSON pointer of the first string (or key) holding a lone surrogate, or None; iterative, any depth."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _encodes(v):
                return path
        elif isinstance(v, dict):
            for k, item in v.items():
                step = f"{path}/{k.replace('~', '~0').replace('/', '~1')}"
                if not _encodes(k):
                    return step.encode("utf-8", "backslashreplace").decode()
                stack.append((step, item))
        elif isinstance(v, list):
            stack.extend((f"{path}/{i}", item) for i, item in enumerate(v))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
