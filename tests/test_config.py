"""A bad configuration stops start-up with the file, the key and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import load_config
from bot.errors import ConfigError
from bot.settings import Settings
from tests.conftest import ROOT

GOOD_AGENT = """
agents:
  desk:
    step: agents.refunds:refund_desk
    tools: [agents.refunds:lookup_order, agents.refunds:issue_refund]
    approvals: {issue_refund: {approvers: ["terminal:*"]}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handrail.yaml"
    path.write_text(text)
    return path


def test_the_shipped_config_loads_with_its_example_agents() -> None:
    config = load_config(ROOT / "config" / "handrail.yaml", ROOT / "prompts")
    assert set(config.agents) == {"refund-desk", "support", "mcp-desk"}
    assert config.route("mcp") == "mcp-desk"
    assert config.agent("mcp-desk").gated("approved_action") is not None
    assert config.route("terminal") == "refund-desk"
    assert config.agent("support").gated("issue_refund") is not None
    assert config.agent("support").gated("lookup_order") is None
    assert config.spec.api_keys["ops"].key_env == "HANDRAIL_API_KEY_OPS"
    assert set(config.spec.schedules) == {"morning-digest"}


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("agents: {}", "agents", "at least 1 item"),
        ("agents:\n  a: {step: nope}", "agents.a.step", "should look like 'package.module:name'"),
        ("agents:\n  a: {step: 'agents.refunds:missing'}", "agents.a.step", "cannot import 'agents.refunds:missing'"),
        ("agents:\n  a: {step: 'agents.refunds:refund_desk', model: x}", "agents.a", "exactly one of 'step'"),
        ("agents:\n  a: {model: x}", "agents.a", "needs 'prompt'"),
        ("agents:\n  a: {model: x, prompt: nope.md}", "agents.a.prompt", "no template at"),
        ("agents:\n  a: {step: 'agents.refunds:refund_desk', max_steps: lots}", "agents.a.max_steps", "valid integer"),
        ("agents:\n  a: {step: 'agents.refunds:refund_desk', colour: blue}", "agents.a.colour", "Extra inputs"),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', tools: ['agents.refunds:ORDERS']}",
            "agents.a.tools[0]",
            "is not a tool",
        ),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', approvals: {refund: {approvers: [x]}}}",
            "agents.a.approvals.refund",
            "not one of this agent's tools",
        ),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', approvals: {}, tools: []}\nroutes: {terminal: b}",
            "routes.terminal",
            "no agent named 'b'",
        ),
        (GOOD_AGENT.replace('["terminal:*"]', "[]"), "agents.desk.approvals.issue_refund.approvers", "at least 1 item"),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', mcp_servers: {gh: {command: [x], url: 'http://h'}}}",
            "agents.a.mcp_servers.gh",
            "exactly one of 'command'",
        ),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', mcp_servers: {gh: {url: 'http://h'}},"
            " approvals: {'gl.merge': {approvers: [x]}}}",
            "agents.a.approvals.gl.merge",
            "not one of this agent's tools",
        ),
        (
            "agents:\n  a: {step: 'agents.refunds:refund_desk', mcp_servers: {'g.h': {url: 'http://h'}}}",
            "agents.a.mcp_servers.g.h",
            "letters, digits",
        ),
        ("agents: [", "", "not valid YAML"),
    ],
)
def test_a_bad_config_names_the_file_the_key_and_the_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ROOT / "prompts")
    assert caught.value.path == str(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: ")


def test_a_missing_config_file_says_how_to_point_at_another(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found \\(set HANDRAIL_CONFIG"):
        load_config(tmp_path / "absent.yaml")


def test_environment_values_fill_in_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESK_APPROVER", "slack:U42")
    path = write(tmp_path, GOOD_AGENT.replace('"terminal:*"', '"${DESK_APPROVER}", "${UNSET_VAR:-api:ops}"'))
    policy = load_config(path).agent("desk").gated("issue_refund")
    assert policy is not None and policy.approvers == ("slack:U42", "api:ops")
    assert policy.allows("slack:U42") and not policy.allows("slack:U43")


def test_settings_reject_a_bad_number_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment: HANDRAIL_PARTITIONS: expected a whole number, got 'many'"):
        Settings.from_env({"HANDRAIL_PARTITIONS": "many"})
    with pytest.raises(ConfigError, match="HANDRAIL_LEASE_MS: must be between 200 and 600000, got 5"):
        Settings.from_env({"HANDRAIL_LEASE_MS": "5"})
    assert Settings.from_env({}).redis_url is None


def test_names_that_become_keys_are_plain(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_AGENT + "api_keys:\n  'a}b': {key_env: X, scopes: [read]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ROOT / "prompts")
    assert (caught.value.key, caught.value.problem) == (
        "api_keys.a}b",
        "names are letters, digits, '.', '_' and '-' (64 at most)",
    )
