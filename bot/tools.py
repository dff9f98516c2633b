"""Tools: async Python functions with a pydantic argument model; the model sees the schema made from it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel

from bot.events import ChannelRef


@dataclass(frozen=True)
class ToolContext:
    """What a running tool may use. Pass ``idempotency_key`` downstream so a retried call is not repeated."""

    thread_id: str
    call_id: str
    idempotency_key: str
    ref: ChannelRef | None
    deps: Any  # the runtime's dependencies (a Redis client at least); see bot.runtime.Deps


ToolFn = Callable[[Any, ToolContext], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args_model: type[BaseModel]
    fn: ToolFn
    repeatable: bool = False  # may run again with the same arguments in one thread (see plan.repeated_call)

    @property
    def wire_name(self) -> str:
        """The name the model calls it by: providers take letters, digits, '_' and '-' only (an MCP server's
        ``github.create_issue`` is ``github__create_issue``)."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.name.replace(".", "__"))[:64]

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function definition litellm passes to any provider."""
        params = self.args_model.model_json_schema()
        params.pop("title", None)
        return {
            "type": "function",
            "function": {"name": self.wire_name, "description": self.description, "parameters": params},
        }

    def validate(self, args: dict[str, Any]) -> BaseModel:
        """Arguments are validated before anything runs; raises pydantic.ValidationError."""
        return self.args_model.model_validate(args)


def tool(fn: ToolFn | None = None, *, name: str | None = None, repeatable: bool = False) -> Any:
    """Make a Tool from ``async def f(args: SomeModel, ctx: ToolContext)``; its docstring is the description.

    A call identical to one that already ran in the thread is refused as a repeat; ``repeatable=True`` lets a tool
    without side effects (a lookup) run again with the same arguments once a human has spoken since.
    """

    def wrap(f: ToolFn) -> Tool:
        if not inspect.iscoroutinefunction(f):
            raise TypeError(f"tool {f.__name__} must be an async function")
        params = list(inspect.signature(f).parameters)
        hints = get_type_hints(f)
        model = hints.get(params[0]) if params else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"tool {f.__name__}: the first parameter must be annotated with a pydantic model")
        doc = inspect.getdoc(f) or ""
        return Tool(name=name or f.__name__, description=doc.strip(), args_model=model, fn=f, repeatable=repeatable)

    return wrap(fn) if fn is not None else wrap
