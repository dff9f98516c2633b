"""The ``handrail`` command: a thin shell over the library calls in bot.control and friends.

This is the wiring layer: the one place that knows which channels exist (imported inside the commands).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

import click
from redis.exceptions import ConnectionError as RedisConnectionError

from bot import approvals, channel, control, retention, threads
from bot.channel import Runner
from bot.errors import HandrailError
from bot.redact import redact, redact_url
from bot.runtime import Deps, open_deps
from bot.timeline import clock, line

T = TypeVar("T")


def _identity(value: str | None) -> str:
    return value or f"terminal:{getpass.getuser()}"


def _terminal_identity(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--as`` names a terminal user only: the CLI cannot prove any other identity, so it must not decide in the
    name of a Slack, email or API user (their decisions' "by" is checked by their channel)."""
    kind, sep, name = (value or "").partition(":")
    if value is not None and (kind != "terminal" or not sep or not name):
        raise click.BadParameter(
            f"{value!r}: the command line acts only as a terminal user, e.g. terminal:alice; Slack, email and API "
            "users decide through their own channel"
        )
    return value


def as_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--as", "identity", metavar="terminal:NAME", callback=_terminal_identity,
        help=f"{help_text} (default: terminal:$USER).",
    )  # fmt: skip


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        click.echo(err=True)  # end the prompt's line
        raise SystemExit(130) from None  # stopped as asked: no traceback, no "Aborted!"
    except HandrailError as exc:
        raise click.ClickException(str(exc)) from None
    except RedisConnectionError as exc:
        raise click.ClickException(
            f"cannot reach Redis ({redact(str(exc))}); check REDIS_URL, or unset it for the embedded one"
        ) from None


def with_deps(
    *, config: bool = True, check_settings: bool = True, before: Callable[..., None] | None = None
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    """Run an async command body with the runtime's dependencies opened (and closed) around it; ``before`` gets
    the command's options first and may refuse to start (a ClickException) before anything is opened."""

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(**kwargs)

            async def main() -> Any:
                async with open_deps(with_config=config, check_settings=check_settings) as deps:
                    return await fn(deps, *args, **kwargs)

            return _run(main())

        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def cli(verbose: bool) -> None:
    """Handrail: small, reliable LLM agents that ask a human before anything that matters.

    Redis comes from REDIS_URL; without it an embedded Redis keeps its data under .handrail/.
    Agents come from config/handrail.yaml (HANDRAIL_CONFIG).

    Whoever can reach that Redis has full control of Handrail, whatever --as says: these commands act as a
    terminal user (--as terminal:NAME) and trust the machine's accounts.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )




async def _until_stopped(*runners: Runner) -> None:
    """Run the given processes side by side until SIGINT or SIGTERM, then stop them cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def stopping_all_on_failure(run: Runner) -> None:
        try:
            await run(stop)
        except SystemExit as exc:  # uvicorn exits like this when it cannot start; it has logged why
            stop.set()
            raise click.ClickException(f"Handrail could not start (exit {exc.code}; the reason is above)") from None
        except BaseException:
            stop.set()  # the other parts stop cleanly, so their connections close and the embedded Redis stops
            raise

    failures = [
        r for r in await asyncio.gather(*(stopping_all_on_failure(run) for run in runners), return_exceptions=True)
        if isinstance(r, BaseException)
    ]  # fmt: skip
    if failures:
        raise failures[0]


def _workers(deps: Deps, count: int) -> list[Runner]:
    from bot.worker import Worker

    return [Worker(deps).run for _ in range(count)]


def _web(deps: Deps, host: str, port: int) -> Runner:
    from bot import web

    return lambda stop: web.serve(deps, stop, host, port)


def _sweeper(deps: Deps) -> retention.Sweeper:
    return retention.Sweeper(deps.redis, deps.keys, channel.thread_keys())


def _retention(deps: Deps) -> Runner:
    s = deps.settings
    return lambda stop: retention.run_sweeper(
        _sweeper(deps), stop, retention_days=s.retention_days, every_s=s.retention_sweep_s
    )


def _expirer(deps: Deps) -> Runner:
    from bot.expiry import run_expirer

    return lambda stop: run_expirer(deps, stop)


def _port_free(*, host: str, port: int, **_: Any) -> None:
    """Refuse to start when the web port is taken: checked by binding it (as uvicorn will, with SO_REUSEADDR),
    before Redis or anything else starts, so a refusal leaves nothing behind."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop what uses it, or choose another "
                f"port with --port or PORT"
            ) from None


host_option = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
port_option = click.option("--port", default=8000, show_default=True, envvar="PORT", help="Port to listen on.")


@cli.command()
@click.option("--workers", default=1, show_default=True, help="Worker loops in this process.")
@host_option
@port_option
@with_deps(before=_port_free)
async def up(deps: Deps, workers: int, host: str, port: int) -> None:
    """Run everything in one process (embedded Redis when REDIS_URL is unset)."""
    logging.getLogger("bot").setLevel(logging.INFO)
    url = deps.settings.redis_url
    where = redact_url(url) if url else f"embedded Redis (data in {deps.settings.data_dir}/)"
    click.echo(f"Handrail is up: {len(deps.agents.agents)} agents, {where}, API on http://{host}:{port}/api/v1/docs")
    if "console" in channel.registered():
        click.echo(f"Open the console in a browser:  http://{host}:{port}/")
    click.echo("Talk to an agent from another terminal:  .venv/bin/handrail chat   (Ctrl-C here stops Handrail)")
    parts = [r for role in channel.ROLES for r in channel.runners(deps, role)]  # every registered channel, every role
    await _until_stopped(*_workers(deps, workers), _web(deps, host, port), _retention(deps), _expirer(deps), *parts)


@cli.command()
@with_deps()
async def worker(deps: Deps) -> None:
    """Run one agent worker, delivering every configured channel's messages too (start as many as you like)."""
    logging.getLogger("bot").setLevel(logging.INFO)
    await _until_stopped(*_workers(deps, 1), *channel.runners(deps, "worker"))


@cli.command()
@click.argument("names", nargs=-1, metavar="[CHANNEL]...")
@with_deps()
async def receive(deps: Deps, names: tuple[str, ...]) -> None:
    """Watch for inbound messages on the named channels (default: every configured one), e.g. the mailbox over
    IMAP IDLE: each new mail becomes a message, a reply or a decision."""
    await _receive(deps, names)


@cli.command(hidden=True)
@with_deps()
async def email(deps: Deps) -> None:
    """Same as 'receive email' (kept for existing Procfiles)."""
    await _receive(deps, ("email",))


async def _receive(deps: Deps, names: tuple[str, ...]) -> None:
    found = channel.registered()
    for name in names:
        if name not in found:
            raise click.ClickException(f"no channel {name!r}; installed: {', '.join(sorted(found))}")
        missing = found[name].missing()
        if missing:
            raise click.ClickException(f"{name} is not configured: {missing}")
    runners = channel.runners(deps, "receive", names)
    if not runners:
        raise click.ClickException("no configured channel receives messages by itself (Slack and the API do, "
                                   "through 'handrail web'); see README")  # fmt: skip
    logging.getLogger("channels").setLevel(logging.INFO)
    await _until_stopped(*runners)


@cli.command()
@host_option
@port_option
@with_deps(before=_port_free)
async def web(deps: Deps, host: str, port: int) -> None:
    """Serve the REST API (/api/v1, docs at /api/v1/docs), inbound webhooks (/hooks), Slack (/slack/events, or
    Socket Mode with SLACK_APP_TOKEN), MCP over Streamable HTTP (/mcp) and /healthz, /readyz."""
    logging.getLogger("bot").setLevel(logging.INFO)
    await _until_stopped(_web(deps, host, port), *channel.runners(deps, "web"))


@cli.command()
@with_deps()
async def scheduler(deps: Deps) -> None:
    """Fire the configured schedules (each scheduled time once, however many schedulers run), expire approvals
    nobody decided in time, and delete finished threads past HANDRAIL_RETENTION_DAYS (one process at a time)."""
    logging.getLogger("channels").setLevel(logging.INFO)
    logging.getLogger("bot.retention").setLevel(logging.INFO)
    logging.getLogger("bot.expiry").setLevel(logging.INFO)
    await _until_stopped(*channel.runners(deps, "scheduler"), _retention(deps), _expirer(deps))


@cli.command()
@click.option("--agent", help="Agent to talk to (default: the route for 'terminal' in the config).")
@click.option("--thread", "thread_id", help="Continue an existing thread.")
@as_option("Who you are, for approvals")
@with_deps()
async def chat(deps: Deps, agent: str | None, thread_id: str | None, identity: str | None) -> None:
    """Talk to an agent in the terminal and decide its approvals at the prompt."""
    from channels.terminal import TerminalChat, stdin_lines

    if thread_id:
        agent = (await threads.get(deps.redis, deps.keys, thread_id)).agent
    name = agent or deps.agents.route("terminal")
    deps.agents.agent(name)
    session = TerminalChat(deps, agent=name, identity=_identity(identity), thread_id=thread_id)
    await session.run(stdin_lines())


@cli.command("mcp")
@as_option("Who makes the requests")
@with_deps()
async def mcp_cmd(deps: Deps, identity: str | None) -> None:
    """Serve Handrail to an MCP client over stdio (request_approval, ask_human, get_decision): put
    `handrail mcp` in the client's mcpServers. Workers must run too (`handrail up` or `handrail worker`)."""
    from channels.mcp.channel import stdio_server

    await stdio_server(deps, _identity(identity)).run_stdio_async()


# -- threads ------------------------------------------------------------------------------------------------


@cli.group("threads")
def threads_cmd() -> None:
    """List, show, launch, pause, resume and cancel threads. Archive or purge finished ones."""


@threads_cmd.command("list")
@click.option("--agent", help="Only this agent's threads.")
@click.option("--status", help="Only threads in this status (running, waiting_approval, done...).")
@click.option("--limit", default=50, show_default=True)
@with_deps()
async def threads_list(deps: Deps, agent: str | None, status: str | None, limit: int) -> None:
    """Threads, most recently active first."""
    rows = await control.list_threads(deps, agent=agent, status=status, limit=limit)
    if not rows:
        click.echo("no threads")
    for r in rows:
        click.echo(f"{r.id:<20} {r.agent:<16} {r.status:<17} {r.events:>4} events  {clock(r.updated)}")


@threads_cmd.command("show")
@click.argument("thread_id")
@click.option("--prompts/--no-prompts", default=True, show_default=True, help="Print the prompt of each model step.")
@with_deps()
async def threads_show(deps: Deps, thread_id: str, prompts: bool) -> None:
    """A thread's timeline, with the exact prompt sent at each model step."""
    thread = await threads.get(deps.redis, deps.keys, thread_id)
    click.echo(f"thread {thread.id}  agent {thread.agent}  status {thread.status}")
    for i, e in enumerate(thread.events):
        click.echo(line(e))
        sent = control.prompt_of(deps, thread, i) if prompts else None
        if sent is not None:
            mark = "verified: identical to what was sent" if sent.verified else "NOT identical (template changed)"
            click.echo(f"    prompt ({mark}):")
            for m in sent.messages:
                click.echo(f"      [{m['role']}]")
                click.echo("        " + str(m["content"]).replace("\n", "\n        "))


@threads_cmd.command("launch")
@click.argument("message")
@click.option("--agent", required=True, help="Agent to start.")
@click.option("--thread", "thread_id", help="Thread id to use (default: a new one).")
@as_option("Who is asking")
@with_deps()
async def threads_launch(deps: Deps, message: str, agent: str, thread_id: str | None, identity: str | None) -> None:
    """Start a thread; follow it with `handrail chat --thread ID`."""
    from bot.events import ChannelRef, new_id
    from channels.terminal import KIND

    tid = thread_id or new_id()
    accepted = await control.launch(
        deps, agent, message, ChannelRef(kind=KIND, address=tid, user=_identity(identity)), thread_id=tid
    )
    click.echo(accepted.thread_id)


def _control_command(name: str, verb: Callable[..., Awaitable[control.Accepted]], help_text: str) -> None:
    @threads_cmd.command(name, help=help_text)
    @click.argument("thread_id")
    @as_option("Who does it")
    @with_deps()
    async def command(deps: Deps, thread_id: str, identity: str | None) -> None:
        await verb(deps, thread_id, _identity(identity))
        click.echo(f"{name}: {thread_id}")


_control_command("pause", control.pause, "Pause a thread: nothing runs until it is resumed.")
_control_command("resume", control.resume, "Resume a paused (or failed) thread.")
_control_command("cancel", control.cancel, "Cancel a thread for good.")


def _older_than(days: int | None, deps: Deps) -> int:
    return (deps.settings.retention_days if days is None else days) * retention.DAY_MS


def _progress(tally: retention.Tally) -> None:
    click.echo(f"  ... {tally}", err=True)


older_than_option = click.option(
    "--older-than", "days", type=click.IntRange(min=0), metavar="DAYS",
    help="Threads whose last event is at least this many days old (default: HANDRAIL_RETENTION_DAYS, 30).",
)  # fmt: skip


@threads_cmd.command("archive")
@older_than_option
@click.option("--to", "path", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="JSON-lines file to append to (default: handrail-archive-<UTC time>.jsonl).")  # fmt: skip
@with_deps(config=False)
async def threads_archive(deps: Deps, days: int | None, path: str | None) -> None:
    """Write finished threads (done, failed, cancelled) to a file, one JSON line each with its events, then
    delete them from Redis. Threads still going on are never touched."""
    from datetime import UTC, datetime
    from pathlib import Path

    target = Path(path or f"handrail-archive-{datetime.now(UTC):%Y%m%d-%H%M%S}.jsonl")
    archive = retention.JsonLinesArchive(target)
    async with retention.sweeping(deps.redis, deps.keys) as lease:
        tally = await _sweeper(deps).sweep(
            now_ms=await retention.redis_now(deps.redis), older_than_ms=_older_than(days, deps),
            archive=archive, lease=lease, progress=_progress,
        )  # fmt: skip
    click.echo(f"{tally}; {archive.written} archived to {target}")


@threads_cmd.command("purge")
@older_than_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_deps(config=False)
async def threads_purge(deps: Deps, days: int | None, yes: bool) -> None:
    """Delete finished threads (done, failed, cancelled) and everything kept for them, without archiving;
    the same as the periodic retention sweep, now. Threads still going on are never touched."""
    older = _older_than(days, deps)
    if not yes and not click.confirm(f"Delete finished threads older than {older // retention.DAY_MS} days?"):
        raise click.Abort()
    async with retention.sweeping(deps.redis, deps.keys) as lease:
        tally = await _sweeper(deps).sweep(
            now_ms=await retention.redis_now(deps.redis), older_than_ms=older, lease=lease, progress=_progress
        )
    click.echo(str(tally))


# -- approvals ------------------------------------------------------------------------------------------------


@cli.group("approvals")
def approvals_cmd() -> None:
    """List and decide pending approvals."""


@approvals_cmd.command("list")
@with_deps(config=False)
async def approvals_list(deps: Deps) -> None:
    """Approvals waiting for a decision, the soonest to expire first."""
    rows = await approvals.pending(deps.redis, deps.keys)
    if not rows:
        click.echo("no pending approvals")
    for a in rows:
        click.echo(f"{a.id:<16} thread {a.thread_id:<16} {a.tool}({json.dumps(a.args, sort_keys=True)})"
                   f"  approvers: {', '.join(a.approvers)}  since {clock(a.requested_at)}")  # fmt: skip


def _report(outcome: approvals.Outcome) -> None:
    if outcome.result != "ok":
        raise click.ClickException(outcome.message)
    click.echo(outcome.message)


@approvals_cmd.command("approve")
@click.argument("approval_id")
@as_option("Who approves")
@click.option("--args", "edited", help="Approve with these arguments instead (a JSON object).")
@with_deps()
async def approvals_approve(deps: Deps, approval_id: str, identity: str | None, edited: str | None) -> None:
    """Approve a pending tool call (it then runs once)."""
    args = None
    if edited is not None:
        try:
            args = json.loads(edited)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
        if not isinstance(args, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--args")
    _report(await control.decide(deps, approval_id, by=_identity(identity), approved=True, args=args))


@approvals_cmd.command("reject")
@click.argument("approval_id")
@click.option("--reason", required=True, help="What the agent should know (it re-plans with it).")
@as_option("Who rejects")
@with_deps()
async def approvals_reject(deps: Deps, approval_id: str, reason: str, identity: str | None) -> None:
    """Reject a pending tool call, with feedback for the agent."""
    _report(await control.decide(deps, approval_id, by=_identity(identity), approved=False, feedback=reason))


# -- dead letters ----------------------------------------------------------------------------------------------


@cli.group("dlq")
def dlq_cmd() -> None:
    """Entries that failed again and again: see why, retry them, or purge them."""


@dlq_cmd.command("list")
@with_deps(config=False)
async def dlq_list(deps: Deps) -> None:
    """Dead letters, oldest first, with their errors."""
    rows = await deps.bus.dead_letters()
    if not rows:
        click.echo("no dead letters")
    for dlq_id, f in rows:
        click.echo(f"{dlq_id}  from {f.get('stream', '?')}: {f.get('error', '')}")


@dlq_cmd.command("purge")
@click.argument("dlq_ids", nargs=-1, metavar="[ID]...")
@click.option("--older-than", "days", type=click.IntRange(min=0), metavar="DAYS",
              help="Every dead letter at least this many days old.")  # fmt: skip
@with_deps(config=False)
async def dlq_purge(deps: Deps, dlq_ids: tuple[str, ...], days: int | None) -> None:
    """Remove dead letters for good: the given ids, or all older than --older-than DAYS (0: all of them)."""
    if (days is None) == (not dlq_ids):
        raise click.UsageError("give either dead-letter ids or --older-than DAYS")
    if days is not None:
        cutoff = await retention.redis_now(deps.redis) - days * retention.DAY_MS
        count = await retention.purge_dead_letters_before(deps.redis, deps.keys, cutoff)
    else:
        count = await retention.purge_dead_letters(deps.redis, deps.keys, dlq_ids)
    click.echo(f"purged {count} dead letter{'s' if count != 1 else ''}")


@dlq_cmd.command("retry")
@click.argument("dlq_id")
@with_deps(config=False)
async def dlq_retry(deps: Deps, dlq_id: str) -> None:
    """Put a dead letter back on its stream."""
    entry = await deps.bus.retry_dead_letter(dlq_id)
    click.echo(f"retried {dlq_id} as {entry}")


# -- schedules -------------------------------------------------------------------------------------------------


@cli.group("schedules")
def schedules_cmd() -> None:
    """List the configured schedules and run one now."""


@schedules_cmd.command("list")
@with_deps()
async def schedules_list(deps: Deps) -> None:
    """Each schedule with its next fire times (local and UTC) and when it last fired."""
    from datetime import UTC, datetime

    from channels import schedules

    rows = await schedules.describe(deps, datetime.now(UTC))
    if not rows:
        click.echo(f"no schedules in {deps.agents.path}")
    for row in rows:
        click.echo("\n".join(row.lines()))


@schedules_cmd.command("run")
@click.argument("name")
@with_deps()
async def schedules_run(deps: Deps, name: str) -> None:
    """Run a schedule once now, in a thread of its own; prints the thread id."""
    from channels import schedules

    click.echo((await schedules.fire_now(deps, name)).thread_id)


# -- installation -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("partitions", type=click.IntRange(1, 1024))
@with_deps(config=False, check_settings=False)
async def repartition(deps: Deps, partitions: int) -> None:
    """Change the partition count to PARTITIONS for every process.

    Stop every worker first. Entries waiting on the inbound streams move to their new partitions, in order;
    then start every process with HANDRAIL_PARTITIONS=PARTITIONS (processes with the old value refuse to start).
    """
    from bot.repartition import repartition as move

    done = await move(deps.redis, deps.keys.ns, partitions, lease_ms=deps.settings.lease_ms)
    click.echo(f"partitions: {done.old} -> {done.new}; {done.moved} waiting entries moved")
    for where in done.dead_lettered:
        click.echo(f"  unreadable entry {where} went to the dead-letter stream ('handrail dlq list')")
    click.echo(f"now start every process with HANDRAIL_PARTITIONS={done.new}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
