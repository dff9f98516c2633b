"""First run: `make run` installs only what Handrail needs and says what it is doing; `handrail up` and `handrail web`
refuse a taken port at once, in one line, leaving nothing behind."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from bot.cli import _until_stopped
from tests.conftest import ROOT, python
from tests.test_embedded_redis import data_dir, embedded_env

__all__ = ["data_dir"]  # the fixture, shared with the embedded Redis tests


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("how", [["--port", "{port}"], ["PORT={port}"]], ids=["--port", "PORT"])
@pytest.mark.parametrize("command", ["up", "web"])
def test_a_taken_port_is_one_line_naming_the_port_and_the_setting_and_starts_nothing(
    data_dir: Path, tmp_path: Path, taken_port: int, command: str, how: list[str]
) -> None:
    env = embedded_env(data_dir, tmp_path)
    args = [command]
    if how[0] == "--port":
        args += ["--port", str(taken_port)]
    else:
        env["PORT"] = str(taken_port)
    started = time.monotonic()
    r = subprocess.run([python(), "-m", "bot.cli", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    took = time.monotonic() - started
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", "nothing claims to be up"
    assert r.stderr.splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{taken_port} (Address already in use); stop what uses it, "
        "or choose another port with --port or PORT"
    ]
    assert took < 5, f"took {took:.1f} s"
    assert not (data_dir / "redis.db.settings").exists(), "no embedded Redis was started"


async def test_when_one_part_fails_to_start_the_others_stop_and_the_command_fails_cleanly() -> None:
    # uvicorn ends with SystemExit when it cannot bind (a port taken between the check and the start)
    stopped = asyncio.Event()

    async def web(stop: asyncio.Event) -> None:
        raise SystemExit(3)

    async def worker(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.set()

    with pytest.raises(click.ClickException, match=r"Handrail could not start \(exit 3; the reason is above\)"):
        await asyncio.wait_for(_until_stopped(web, worker), 5)
    assert stopped.is_set(), "the worker was told to stop"


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make TARGET` runs on a machine without ``venv`` (make -n prints them and runs nothing)."""
    # --no-print-directory: under another make (CI's `make test`) it would say "Entering directory …"
    r = subprocess.run(["make", "-n", "--no-print-directory", f"VENV={venv}", "PYTHON=python3", target], cwd=ROOT,
                       capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return r.stdout.replace(str(venv), "V").splitlines()


def test_make_run_installs_handrail_without_the_test_tools_saying_what_each_slow_step_does(tmp_path: Path) -> None:
    assert dry_run("run", tmp_path / "venv") == [
        'echo "Creating V, a Python environment of Handrail\'s own…"',
        "python3 -m venv V",
        "V/bin/pip --disable-pip-version-check install --quiet --upgrade pip",
        'echo "Installing Handrail\'s dependencies (about a minute)…"',
        "V/bin/pip --disable-pip-version-check install --progress-bar on -e .",  # not quiet: a line per package
        "touch V/.installed-runtime",
        "V/bin/handrail up",
    ]


@pytest.mark.parametrize("target", ["test", "lint", "bench"])
def test_make_test_lint_and_bench_install_the_test_tools(tmp_path: Path, target: str) -> None:
    steps = dry_run(target, tmp_path / "venv")
    assert "V/bin/pip --disable-pip-version-check install --progress-bar on -e '.[dev]'" in steps
    assert steps[steps.index("python3 -m venv V") - 1].startswith("echo ")
