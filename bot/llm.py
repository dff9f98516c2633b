"""The LLM step: render the thread, call the model through litellm, turn its tool call into a Step.

litellm takes seconds to import and fetches a price list at import unless told not to, so it is imported
on the first model call only, with its bundled price list.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.agent import AskHuman, CallTool, Malformed, SendReply, StepOutcome
from bot.context import render, request_sha
from bot.errors import ModelNotConfigured, ModelRefused, ModelUnavailableError
from bot.events import Event, LLMInfo
from bot.redact import redact
from bot.tools import Tool

# The two ways to end a turn, offered to the model next to the agent's own tools.
_BUILTIN_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "reply",
            "description": "Send your answer to the user and end your turn.",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "ask_human",
            "description": "Ask the user a question you need answered before you can go on.",
            "parameters": {
                "type": "object",
                "properties": {"question": {"type": "string"}},
                "required": ["question"],
            },
        },
    },
]


def load_litellm() -> Any:
    """Import litellm with its bundled price list (no network at import)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # litellm's own TypedDicts make pydantic print ~130 warnings at import; they say nothing to a Handrail user.
    # A filter, not catch_warnings: this runs in a thread while the event loop goes on.
    warnings.filterwarnings("ignore", message=r".* (is|are) using the `ReadOnly` qualifier", category=UserWarning)
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


class LLMStep:
    """An agent step backed by a model. Its output is parsed here and validated by the runtime."""

    def __init__(
        self,
        *,
        agent: str,
        model: str,
        template_path: Path,
        tools: dict[str, Tool],
        api_base: str | None = None,
        temperature: float = 0.0,
        timeout: float = 120.0,
    ) -> None:
        self.agent, self.model, self.template_path = agent, model, template_path
        self.tools, self.api_base, self.temperature, self.timeout = tools, api_base, temperature, timeout

    def request(self, events: Sequence[Event]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        """The exact messages and tools sent for this log, and the template's hash."""
        template = self.template_path.read_text()
        system = string.Template(template).safe_substitute(
            agent=self.agent, tools=", ".join(sorted(self.tools)) or "(none)"
        )
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": render(events)},
        ]
        tools = [t.schema() for t in self.tools.values()] + _BUILTIN_TOOLS
        return messages, tools, hashlib.sha256(template.encode()).hexdigest()[:16]

    def check_configured(self, litellm: Any) -> None:
        if self.api_base:
            return  # a local server (Ollama, vLLM, a test double) needs no provider key
        env = litellm.validate_environment(model=self.model)
        if not env.get("keys_in_environment", False):
            missing = ", ".join(env.get("missing_keys") or []) or "the provider's API key"
            raise ModelNotConfigured(
                f"agent {self.agent!r} uses model {self.model!r}, which needs {missing}: "
                f"set {missing} in the environment (or point the agent at another model) and resume the thread"
            )

    async def __call__(self, events: Sequence[Event]) -> StepOutcome:
        litellm = load_litellm()
        self.check_configured(litellm)
        messages, tools, template_sha = self.request(events)
        try:
            resp = await litellm.acompletion(
                model=self.model,
                messages=messages,
                tools=tools,
                tool_choice="required",
                temperature=self.temperature,
                api_base=self.api_base,
                timeout=self.timeout,
                max_retries=0,  # the runtime retries, with backoff measured in minutes and a record in the log
            )
        except Exception as exc:
            raise classify(litellm, exc, self.model) from None
        message = resp.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in (message.tool_calls or [])]
        raw = json.dumps({"content": message.content, "tool_calls": calls}, separators=(",", ":"))
        try:
            cost = float(litellm.completion_cost(completion_response=resp))
        except Exception:  # an unpriced (local) model: cost unknown, recorded as 0
            cost = 0.0
        usage = getattr(resp, "usage", None)
        info = LLMInfo(
            model=self.model,
            raw=raw,
            tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
            tokens_out=int(getattr(usage, "completion_tokens", 0) or 0),
            cost=cost,
            prompt_sha=request_sha(messages, tools),
            prompt_upto=len(events),
            template_sha=template_sha,
        )
        wire = {t.wire_name: name for name, t in self.tools.items()}  # the model calls tools by their wire names
        named = [{**c, "name": wire.get(c["name"], c["name"])} for c in calls]
        return StepOutcome(parse(named, message.content, set(self.tools)), info)


# 408 timeout, 409 conflict, 425 too early, 429 rate limit: the same request can succeed later.
_RETRYABLE = frozenset({408, 409, 425, 429})


def classify(litellm: Any, exc: Exception, model: str) -> Exception:
    """A model call's failure as the runtime sees it: unavailable for now (retried later, the message kept) or
    refused for good (the thread fails with the reason). Anything unrecognised is returned as it is."""
    import openai  # litellm's exceptions derive from the OpenAI client's, whatever the provider

    if not isinstance(exc, openai.APIError):
        return exc
    status = getattr(exc, "status_code", None)
    reason = f"{model}: {type(exc).__name__}" + (f" {status}" if status else "") + f": {_short(exc)}"
    if isinstance(exc, litellm.APIConnectionError | litellm.Timeout) or status is None:
        return ModelUnavailableError(reason)
    if status in _RETRYABLE or status >= 500:
        return ModelUnavailableError(reason, _retry_after(exc))
    return ModelRefused(reason)


def _short(exc: Exception, limit: int = 300) -> str:
    """The provider's message, cut short and with anything that looks like a key masked."""
    text = " ".join(str(exc).split())
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        value = float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def parse(
    calls: list[dict[str, Any]], content: str | None, tool_names: set[str]
) -> CallTool | SendReply | AskHuman | Malformed:
    """Turn the model's answer into a step, or say precisely what was wrong with it."""
    if not calls:
        if content and content.strip():
            return SendReply(content.strip())
        return Malformed("empty_output", "the answer had neither a tool call nor text")
    if len(calls) > 1:
        return Malformed("several_calls", "call exactly one tool per step")
    name, arguments = calls[0]["name"], calls[0]["arguments"] or "{}"
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as exc:
        return Malformed("bad_json", f"arguments of {name} are not valid JSON: {exc.msg} at {exc.pos}")
    if not isinstance(args, dict):
        return Malformed("bad_json", f"arguments of {name} must be a JSON object")
    if name == "reply" and isinstance(args.get("text"), str):
        return SendReply(args["text"])
    if name == "ask_human" and isinstance(args.get("question"), str):
        return AskHuman(args["question"])
    if name in ("reply", "ask_human"):
        return Malformed("invalid_arguments", f"{name} needs a string {'text' if name == 'reply' else 'question'}")
    if name not in tool_names:
        return Malformed("unknown_tool", f"there is no tool {name!r}; use one of {sorted(tool_names)}")
    return CallTool(name, args)
