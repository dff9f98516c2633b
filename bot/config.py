"""config/handrail.yaml: agents, routes and approval policies, read once and checked loudly at start-up."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.agent import DEFAULT_EXPIRY, Agent, ApprovalPolicy, Outage, Prefetch, StepFn, deterministic
from bot.errors import ConfigError
from bot.tools import Tool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApprovalSpec(_Strict):
    approvers: list[str] = Field(min_length=1)
    expires_after: float = Field(default=DEFAULT_EXPIRY, gt=0, le=366 * 24 * 3600,
                                 description="seconds a request may wait for a decision (default 7 days)")  # fmt: skip

    @field_validator("approvers")
    @classmethod
    def _exact_email_approvers(cls, approvers: list[str]) -> list[str]:
        # anyone may send mail in any name: "email:*" would let a requester approve their own request by reply
        for approver in approvers:
            if approver.lower().startswith("email:") and "*" in approver:
                raise ValueError(f"{approver!r} is not allowed: email approvers must be exact addresses")
        return [a.lower() if a.lower().startswith("email:") else a for a in approvers]  # compared lower-case


class PrefetchSpec(_Strict):
    tool: str
    args: dict[str, Any] = {}


class TimeoutsSpec(_Strict):
    """Seconds a step may take before it is abandoned (a model call) or recorded as failed (a tool call)."""

    model: float = Field(default=120, gt=0, le=3600)
    tool: float = Field(default=60, gt=0, le=86400)
    tools: dict[str, float] = {}  # per tool, overriding ``tool``


class OutageSpec(_Strict):
    """A model that cannot be reached: retry after retry_first seconds, doubling up to retry_max, and tell the
    thread's humans once it has been away notify_after seconds. The user's message is never dropped."""

    retry_first: float = Field(default=5, gt=0, le=3600)
    retry_max: float = Field(default=300, gt=0, le=86400)
    notify_after: float = Field(default=60, ge=0, le=86400)


class McpServerSpec(_Strict):
    """An MCP server whose tools the agent may call: a stdio ``command`` or a Streamable HTTP ``url``. Credentials
    come from the environment (``${VAR}`` in ``env`` or ``headers``)."""

    command: list[str] = []
    url: str | None = Field(default=None, pattern=r"^https?://")
    env: dict[str, str] = {}  # extra environment of a stdio server
    headers: dict[str, str] = {}  # HTTP headers, e.g. {Authorization: "Bearer ${GITHUB_TOKEN}"}
    timeout: float = Field(default=30, gt=0, le=600)  # seconds to connect and list its tools

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if bool(self.command) == bool(self.url):
            raise ValueError("give exactly one of 'command' (a stdio server) or 'url' (Streamable HTTP)")
        return self


class AgentSpec(_Strict):
    description: str = ""
    step: str | None = None  # "module:function" for a deterministic agent
    model: str | None = None  # a litellm model name for an LLM agent
    api_base: str | None = None
    prompt: str | None = None  # file under prompts/
    tools: list[str] = []  # "module:attribute" of Tool objects
    approvals: dict[str, ApprovalSpec] = {}
    prefetch: list[PrefetchSpec] = []
    max_steps: int = Field(default=12, ge=1, le=200)
    temperature: float = 0.0
    timeouts: TimeoutsSpec = TimeoutsSpec()
    model_outage: OutageSpec = OutageSpec()
    mcp_servers: dict[str, McpServerSpec] = {}  # name -> server; its tools are NAME.TOOL (approvals: NAME.*)

    @model_validator(mode="after")
    def _one_kind(self) -> AgentSpec:
        self.api_base = self.api_base or None  # "${VAR:-}" left empty means none
        if (self.step is None) == (self.model is None):
            raise ValueError("give exactly one of 'step' (deterministic agent) or 'model' (LLM agent)")
        if self.model is not None and self.prompt is None:
            raise ValueError("an LLM agent needs 'prompt' (a template file under prompts/)")
        return self


SCOPES = ("launch", "read", "decide")
WEBHOOK_EVENTS = ("approval.requested", "approval.decided", "thread.done", "thread.failed")
_ENV_NAME = r"^[A-Z][A-Z0-9_]*$"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHANNEL = re.compile(r"^(api|[a-z][a-z0-9_-]{0,31}:\S{1,256})$")


class ApiKeySpec(_Strict):
    """An API key; the secret itself stays in the environment, under ``key_env``."""

    key_env: str = Field(pattern=_ENV_NAME)
    scopes: list[Literal["launch", "read", "decide"]] = Field(min_length=1)
    # Where threads this key launches may talk to humans: a channel kind with one address ("slack:C0123",
    # "email:ops@example.com") or with any ("email:*"); "api" (the default) keeps them on the API alone.
    channels: list[str] = Field(default=["api"], min_length=1)
    agents: list[str] = ["*"]  # agent names this key may launch, message and read; "*" for all

    @model_validator(mode="after")
    def _known_channel_forms(self) -> ApiKeySpec:
        for entry in self.channels:
            if not _CHANNEL.match(entry):
                raise ValueError(f"channels: {entry!r} should be 'api', 'KIND:ADDRESS' or 'KIND:*'")
        return self


class WebhookSpec(_Strict):
    """A subscriber to thread events, sent signed POSTs (see README: verifying webhooks)."""

    url: str = Field(pattern=r"^https?://")
    secret_env: str = Field(pattern=_ENV_NAME)
    events: list[Literal["approval.requested", "approval.decided", "thread.done", "thread.failed"]] = Field(
        min_length=1
    )


class ChannelSpec(_Strict):
    """Where a thread started by a schedule or a trigger talks to humans."""

    kind: str = "terminal"
    address: str = ""
    user: str = ""


class TriggerSpec(_Strict):
    """A signed inbound webhook (POST /hooks/NAME) that launches a thread."""

    agent: str
    secret_env: str = Field(pattern=_ENV_NAME)
    thread_key: str = ""  # a JSON pointer into the payload: the same value continues the same thread
    channel: ChannelSpec = ChannelSpec()


class ScheduleSpec(_Strict):
    cron: str
    timezone: str = "UTC"
    agent: str
    message: str
    channel: ChannelSpec = ChannelSpec()
    catch_up: Literal["skip", "run_once"] = "skip"  # what to do about times missed while no scheduler ran

    @model_validator(mode="after")
    def _valid_times(self) -> ScheduleSpec:
        from croniter import croniter

        if not croniter.is_valid(self.cron):
            raise ValueError(f"cron: {self.cron!r} is not a valid cron expression")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from None
        return self


class ConfigSpec(_Strict):
    agents: dict[str, AgentSpec] = Field(min_length=1)
    routes: dict[str, str] = {}  # channel kind (or kind:address) -> agent name
    api_keys: dict[str, ApiKeySpec] = {}
    webhooks: dict[str, WebhookSpec] = {}
    triggers: dict[str, TriggerSpec] = {}
    schedules: dict[str, ScheduleSpec] = {}


_ENV = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in strings come from the environment."""
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


class Config:
    """The loaded configuration: specs as written, and the agents built from them."""

    def __init__(self, path: Path, spec: ConfigSpec, agents: dict[str, Agent]) -> None:
        self.path, self.spec, self.agents = path, spec, agents

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise ConfigError(str(self.path), f"agents.{name}", "no such agent") from None

    def route(self, kind: str, address: str = "") -> str:
        """Which agent answers on a channel: ``kind:address`` first, then ``kind``, then the first agent."""
        routes = self.spec.routes
        return routes.get(f"{kind}:{address}") or routes.get(kind) or next(iter(self.agents))


def load_config(path: str | Path, prompts_dir: str | Path = "prompts") -> Config:
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(where, "", "file not found (set HANDRAIL_CONFIG to another path)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, "", f"not valid YAML: {exc}") from None
    try:
        spec = ConfigSpec.model_validate(_interpolate(raw or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        raise ConfigError(where, key, err["msg"]) from None
    prompts = Path(prompts_dir)
    agents = {name: _build_agent(where, name, a, prompts) for name, a in spec.agents.items()}
    for kind, target in spec.routes.items():
        if target not in agents:
            raise ConfigError(where, f"routes.{kind}", f"no agent named {target!r}")
    for section in ("api_keys", "webhooks", "triggers", "schedules"):
        for name in getattr(spec, section):  # names end up in thread ids, Redis keys and idempotency keys
            if not _NAME.match(name):
                raise ConfigError(
                    where, f"{section}.{name}", "names are letters, digits, '.', '_' and '-' (64 at most)"
                )
    for name, api_key in spec.api_keys.items():
        for agent in api_key.agents:
            if agent != "*" and agent not in agents:
                raise ConfigError(where, f"api_keys.{name}.agents", f"no agent named {agent!r}")
    for section, entries in (("triggers", spec.triggers), ("schedules", spec.schedules)):
        for name, entry in entries.items():
            if entry.agent not in agents:
                raise ConfigError(where, f"{section}.{name}.agent", f"no agent named {entry.agent!r}")
    return Config(path, spec, agents)


def _import(where: str, key: str, dotted: str) -> Any:
    module, _, attr = dotted.partition(":")
    if not attr:
        raise ConfigError(where, key, f"{dotted!r} should look like 'package.module:name'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(where, key, f"cannot import {dotted!r}: {exc}") from None


def _build_agent(where: str, name: str, spec: AgentSpec, prompts: Path) -> Agent:
    base = f"agents.{name}"
    tools: dict[str, Tool] = {}
    for i, dotted in enumerate(spec.tools):
        t = _import(where, f"{base}.tools[{i}]", dotted)
        if not isinstance(t, Tool):
            raise ConfigError(where, f"{base}.tools[{i}]", f"{dotted!r} is not a tool (use @tool)")
        tools[t.name] = t
    for server in spec.mcp_servers:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", server):
            raise ConfigError(where, f"{base}.mcp_servers.{server}", "names are letters, digits, '_' and '-'")
    for tool_name in spec.approvals:
        lent = tool_name.partition(".")[0] in spec.mcp_servers  # an MCP server's tool (listed at run time)
        if tool_name not in tools and not lent and "*" not in tool_name:
            raise ConfigError(where, f"{base}.approvals.{tool_name}", "not one of this agent's tools")
    for i, p in enumerate(spec.prefetch):
        if p.tool not in tools:
            raise ConfigError(where, f"{base}.prefetch[{i}].tool", f"{p.tool!r} is not one of this agent's tools")
        if p.tool in spec.approvals:
            raise ConfigError(where, f"{base}.prefetch[{i}].tool", "a pre-fetch tool cannot need approval")
    for tool_name, seconds in spec.timeouts.tools.items():
        if tool_name not in tools:
            raise ConfigError(where, f"{base}.timeouts.tools.{tool_name}", "not one of this agent's tools")
        if not 0 < seconds <= 86400:
            raise ConfigError(where, f"{base}.timeouts.tools.{tool_name}", "seconds between 0 and 86400")
    step: StepFn
    if spec.step is not None:
        step = deterministic(_import(where, f"{base}.step", spec.step))
    else:
        from bot.llm import LLMStep  # no litellm import here: LLMStep imports it on its first call

        template = prompts / str(spec.prompt)
        if not template.is_file():
            raise ConfigError(where, f"{base}.prompt", f"no template at {template}")
        step = LLMStep(
            agent=name,
            model=str(spec.model),
            template_path=template,
            tools=tools,
            api_base=spec.api_base,
            temperature=spec.temperature,
            timeout=spec.timeouts.model,
        )
    prepare = None
    if spec.mcp_servers:
        from bot.mcp_tools import McpServers, ServerSpec

        servers = [ServerSpec(n, tuple(m.command), m.url or "", dict(m.env), dict(m.headers), m.timeout)
                   for n, m in spec.mcp_servers.items()]  # fmt: skip
        prepare = McpServers(name, servers, tools).prepare  # adds to ``tools``, which the LLM step shares
    return Agent(
        name=name,
        step=step,
        tools=tools,
        prepare=prepare,
        approvals={t: ApprovalPolicy(tuple(a.approvers), a.expires_after) for t, a in spec.approvals.items()},
        max_steps=spec.max_steps,
        prefetch=tuple(Prefetch(p.tool, p.args) for p in spec.prefetch),
        description=spec.description,
        step_timeout=spec.timeouts.model,
        tool_timeout=spec.timeouts.tool,
        tool_timeouts=dict(spec.timeouts.tools),
        outage=Outage(**spec.model_outage.model_dump()),
    )
