"""Approval-cycle benchmark: the real runtime, a real Redis, one worker OS process and an instant agent.

A cycle is: message in (control.launch / control.send onto the inbound stream) -> worker step -> approval
requested (outbox) -> decision in (control.decide) -> tool runs -> reply out (outbox). The agent
(bench/agent.py) is deterministic and its tool instant, so everything timed is Handrail and Redis.

Four figures, each against its target:
  1. throughput: cycles/s of ONE worker process with many threads in flight (closed loop);
  2. latency: per inbound event, published -> the worker's last commit for it, at a fixed offered rate
     (open loop: the schedule does not wait for the worker);
  3. memory: Redis bytes per thread paused on an approval, per thread key and as the used_memory delta / N;
  4. slow model: model steps/s of ONE worker process when each model call takes 1 s and hundreds of threads are
     in flight, and how long a thread that is ready waits beyond its own model call (closed loop).

Each phase runs in its own namespace with its own worker process, and deletes its keys when done.
Run: .venv/bin/python -m bench.cycles [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from bot import codec, control
from bot.bus import Bus
from bot.config import load_config
from bot.events import ChannelRef, MessageReceived, ThreadLaunched, new_id
from bot.keys import Keys
from bot.outbox import Outbound, OutboxConsumer, Receipt
from bot.runtime import Deps
from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "config.yaml"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
AGENT = "bench-desk"
KIND = "terminal"  # the shipped channel; its outbox stream is <ns>:out:terminal
APPROVER = "terminal:bench"  # matches the bench agent's "terminal:*" policy
WAIT_S = 30.0  # longest a driver waits for one outbox message before declaring the worker stuck

TARGET_CYCLES_PER_S = 500.0
TARGET_P50_MS, TARGET_P99_MS = 2.0, 10.0
TARGET_BYTES_PER_THREAD = 8 * 1024
TARGET_SLOW_STEPS_PER_S = 300.0
TARGET_READY_WAIT_P99_S = 1.5
SLOW_AGENT = "bench-model"


T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not run (worker died, Redis unreachable, a cycle stalled...)."""


# -- options ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    redis_url: str
    phases: frozenset[str]
    concurrency: int
    cycles_per_thread: int
    warmup: float
    duration: float
    rate: float
    threads: int
    paused_cycles: int
    text_bytes: int
    partitions: int
    consumers: int
    settle: float
    profile: Path | None
    dump: Path | None
    strict: bool
    keep_keys: bool
    seed: int
    slow_threads: int = 400
    model_seconds: float = 1.0


PHASES = ("throughput", "latency", "memory", "slow")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.cycles",
        description="Drive full approval cycles through the real runtime (one worker process, real Redis) and "
        "report throughput, per-event latency at a fixed rate, and Redis memory per paused thread.",
        epilog=f"Redis comes from REDIS_URL (default {DEFAULT_REDIS}); every run uses fresh namespaces and "
        "deletes their keys at the end.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (a few seconds per phase)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of: %(default)s")
    p.add_argument("--concurrency", type=int, default=200, help="Handrail threads in flight (throughput, memory build)")
    p.add_argument(
        "--cycles-per-thread",
        type=int,
        default=3,
        help="cycles before a thread is retired and a new one launched (throughput, latency)",
    )
    p.add_argument("--warmup", type=float, help="seconds before measuring (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds measured (default 10, quick 3)")
    p.add_argument("--rate", type=float, default=1000.0, help="offered inbound events/s for the latency phase")
    p.add_argument("--threads", type=int, help="paused threads built for the memory phase (default 2000, quick 200)")
    p.add_argument(
        "--paused-cycles",
        type=int,
        default=3,
        help="full cycles each memory-phase thread goes through before its final, pending approval",
    )
    p.add_argument("--text-bytes", type=int, default=150, help="size of each customer message")
    p.add_argument("--partitions", type=int, default=16, help="inbound partitions (HANDRAIL_PARTITIONS)")
    p.add_argument("--consumers", type=int, default=4, help="outbox delivery consumers in the memory phase")
    p.add_argument(
        "--settle",
        type=float,
        help="before each timed phase, wait up to this many seconds for the machine to go quiet (below 10%% of "
        "its CPU busy), since other load skews the timings (default 15, quick 0)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the throughput phase's worker under cProfile, dump the stats to FILE and print "
        "the top entries (the profiler slows the worker: that phase's figure is then not a result)",
    )
    p.add_argument(
        "--dump",
        type=Path,
        metavar="CSV",
        help="write the latency phase's per-event times (published, handling began, committed, outbox read; "
        "seconds since the window opened) to CSV",
    )
    p.add_argument("--slow-threads", type=int, help="threads in flight, slow-model phase (default 400, quick 100)")
    p.add_argument("--model-seconds", type=float, default=1.0, help="how long each model call takes (slow phase)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--keep-keys", action="store_true", help="leave the namespaces' keys in Redis (for debugging)")
    p.add_argument("--seed", type=int, default=1, help="seed for the generated messages")
    a = p.parse_args(argv)
    phases = frozenset(x.strip() for x in a.phases.split(",") if x.strip())
    if not phases or not phases <= set(PHASES):
        p.error(f"--phases: choose from {', '.join(PHASES)}")
    if a.text_bytes < 40:
        p.error("--text-bytes must be at least 40 (the request itself needs room)")
    return Options(
        redis_url=os.environ.get("REDIS_URL") or DEFAULT_REDIS,
        phases=phases,
        concurrency=max(1, a.concurrency),
        cycles_per_thread=max(1, a.cycles_per_thread),
        warmup=a.warmup if a.warmup is not None else (1.0 if a.quick else 3.0),
        duration=a.duration if a.duration is not None else (3.0 if a.quick else 10.0),
        rate=a.rate,
        threads=a.threads if a.threads is not None else (200 if a.quick else 2000),
        paused_cycles=max(0, a.paused_cycles),
        text_bytes=a.text_bytes,
        partitions=a.partitions,
        consumers=max(1, a.consumers),
        settle=a.settle if a.settle is not None else (0.0 if a.quick else 15.0),
        profile=a.profile,
        dump=a.dump,
        strict=a.strict,
        keep_keys=a.keep_keys,
        seed=a.seed,
        slow_threads=max(1, a.slow_threads if a.slow_threads is not None else (100 if a.quick else 400)),
        model_seconds=max(0.0, a.model_seconds),
    )


def say(text: str) -> None:
    print(text, flush=True)


# -- the worker process ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process from /proc (None where that is not readable, e.g. a remote Redis)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": field 3 onwards; utime and stime are 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerProcess:
    """One worker OS process serving one namespace; its log goes to a temporary file (see Phase).

    Plain ``handrail worker`` unless timings or a profile are wanted; then ``python -m bench.worker``, which
    is the same command with the instrument wrapped around it from outside.
    """

    def __init__(self, opts: Options, ns: str, *, timings: Path | None = None, profile: Path | None = None) -> None:
        self.opts, self.ns, self.timings, self.profile = opts, ns, timings, profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"{ns}-worker.log"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.opts.redis_url,
            HANDRAIL_CONFIG=str(CONFIG),
            HANDRAIL_NAMESPACE=self.ns,
            HANDRAIL_PARTITIONS=str(self.opts.partitions),
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),  # bench.agent
        )
        handrail = Path(sys.executable).parent / "handrail"
        if self.timings or self.profile or not handrail.exists():
            cmd = [sys.executable, "-m", "bench.worker"]
            if self.timings:
                env["BENCH_TIMINGS"] = str(self.timings)
            if self.profile:
                env["BENCH_PROFILE"] = str(self.profile)
        else:
            cmd = [str(handrail), "worker"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def ready(self, deps: Deps, timeout: float = 15.0) -> None:
        """Wait until the worker holds every partition's lease, so the first event is not timed waiting for it."""
        leases = [deps.keys.lease(p) for p in range(deps.keys.partitions)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"the worker exited at start-up:\n{self.log_tail()}")
            if await deps.redis.exists(*leases) == len(leases):
                return
            await asyncio.sleep(0.05)
        raise BenchError(f"the worker did not take its partitions within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop that releases the leases and writes any instrument files), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def problems(self) -> int:
        """Errors the worker logged (failed events, dead letters, lost partitions): any makes the run suspect."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if " ERROR " in line or " WARNING " in line or "Traceback" in line)


@dataclass
class CpuMeter:
    """CPU used by the worker, this driver and (when local) redis-server over a window, in % of one core."""

    worker_pid: int
    redis_pid: int | None
    start: dict[str, float | None] = field(default_factory=dict)
    began: float = 0.0

    def _now(self) -> dict[str, float | None]:
        t = os.times()
        return {
            "worker": cpu_seconds(self.worker_pid),
            "driver": t.user + t.system,
            "redis": cpu_seconds(self.redis_pid) if self.redis_pid else None,
            "machine": machine_cpu_seconds(),
        }

    def begin(self) -> None:
        self.start, self.began = self._now(), time.monotonic()

    def end(self) -> str:
        now, wall = self._now(), max(time.monotonic() - self.began, 1e-9)
        used = {}
        for name, t1 in now.items():
            t0 = self.start.get(name)
            if t0 is not None and t1 is not None:
                used[name] = 100 * (t1 - t0) / wall
        parts = [f"{name} {pct:.0f}%" for name, pct in used.items() if name != "machine"]
        if "machine" in used:
            # what the rest of the machine used meanwhile: other load skews the figures
            others = used["machine"] - sum(pct for name, pct in used.items() if name != "machine")
            parts.append(f"other processes {max(others, 0):.0f}% (of {os.cpu_count()} cores)")
        return "CPU (% of one core): " + ", ".join(parts) if parts else ""


def machine_cpu_seconds() -> float | None:
    """CPU time all cores spent busy (not idle or waiting on I/O), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


async def settle(max_wait: float, busy_below: float = 0.10) -> None:
    """Wait (up to ``max_wait`` s) until the machine has been nearly idle for a second: we share it."""
    deadline = time.monotonic() + max_wait
    cores = os.cpu_count() or 1
    while time.monotonic() < deadline:
        before = machine_cpu_seconds()
        await asyncio.sleep(1.0)
        after = machine_cpu_seconds()
        if before is None or after is None or (after - before) / cores < busy_below:
            return
    if max_wait > 0:
        say(f"   (the machine stayed busy for {max_wait:g}s; measuring anyway: see 'other processes' below)")


async def redis_pid(redis: aioredis.Redis) -> int | None:
    """redis-server's pid, if it is a process on this machine (so /proc can tell its CPU)."""
    pid = int((await redis.info("server")).get("process_id", 0))
    return pid if _is_redis(pid) else None


def _is_redis(pid: int) -> bool:
    try:
        return "redis" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


# -- driving cycles ---------------------------------------------------------------------------------------------


def settings(opts: Options, ns: str) -> Settings:
    return Settings(
        redis_url=opts.redis_url, config_path=CONFIG, data_dir=ROOT / ".handrail", partitions=opts.partitions,
        namespace=ns,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def open_deps(opts: Options, ns: str) -> AsyncIterator[Deps]:
    """bot.runtime.open_deps, but with a connection pool sized for the driver's concurrency: the runtime's
    client (bot.connections.connect) gets redis-py's default pool, which refuses a 101st connection."""
    s = settings(opts, ns)
    client = aioredis.Redis.from_url(opts.redis_url, max_connections=max(opts.concurrency, opts.slow_threads) + 100)
    try:
        keys = Keys(s.namespace, s.partitions)
        bus = Bus(client, keys)
        yield Deps(client, keys, bus, s, load_config(CONFIG))
    finally:
        await client.aclose()


class Phase:
    """One phase's namespace, worker process and driver tasks, torn down in a safe order: driver tasks
    first, then the worker, then the keys. The worker's log is kept only if it reported problems."""

    def __init__(self, opts: Options, ns: str, deps: Deps, worker: WorkerProcess) -> None:
        self.opts, self.ns, self.deps, self.worker = opts, ns, deps, worker
        self.tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def start_worker(self) -> None:
        self.worker.start()
        await self.worker.ready(self.deps)


@contextlib.asynccontextmanager
async def phase(opts: Options, ns: str, worker: WorkerProcess, *, timed: bool = True) -> AsyncIterator[Phase]:
    if timed:  # memory does not depend on the machine's load; timings do
        await settle(opts.settle)
    try:
        async with open_deps(opts, ns) as deps:
            ph = Phase(opts, ns, deps, worker)
            try:
                yield ph
            finally:
                for t in ph.tasks:
                    t.cancel()
                await asyncio.gather(*ph.tasks, return_exceptions=True)
    finally:
        worker.stop()
        if not opts.keep_keys:
            await drop_namespace(opts.redis_url, ns)
        if not worker.problems():
            worker.log_path.unlink(missing_ok=True)


_FILLER = (
    " The parcel came two weeks late, the box was crushed and the item inside does not power on; I have photos"
    " of the damage and the delivery note if you need them."
)


def message_text(rng: random.Random, size: int) -> str:
    """A customer's message of ``size`` characters that the bench agent reads as a refund request."""
    order, cents = f"A{rng.randrange(1000, 10000)}", rng.randrange(100, 50000)
    text = f"Hello, please refund {order} {cents} to the card I paid with."
    while len(text) < size:
        text += _FILLER
    return text[:size]


class Router:
    """Hands each outbox message to whoever waits for it: a future per (thread, kind), and/or a callback."""

    def __init__(self, on_message: Callable[[str, str, dict[str, Any] | None, float], None] | None = None) -> None:
        self.waiting: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.on_message = on_message

    def expect(self, thread_id: str, kind: str) -> asyncio.Future[dict[str, Any]]:
        """Register before publishing, so a fast worker's answer cannot arrive unseen."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[(thread_id, kind)] = fut
        return fut

    def feed(self, thread_id: str, kind: str, approval: dict[str, Any] | None, seen_at: float) -> None:
        fut = self.waiting.pop((thread_id, kind), None)
        if fut is not None and not fut.done():
            fut.set_result(approval or {})
        if self.on_message is not None:
            self.on_message(thread_id, kind, approval, seen_at)


async def read_outbox(redis: aioredis.Redis, stream: str, router: Router, stop: asyncio.Event) -> None:
    """Follow the outbox with plain XREAD: the lightest reader, so the driver leaves the CPU to the worker.

    (Delivery through OutboxConsumer, with receipts, is what the memory phase uses: there it is the point.)
    """
    last: bytes | str = "0-0"
    while not stop.is_set():
        got = await redis.xread({stream: last}, count=1000, block=50)
        seen_at = time.time()
        for _, entries in got or []:
            for entry_id, fields in entries:
                last = entry_id
                m = json.loads(fields[b"m"])
                router.feed(m["thread_id"], m["kind"], m.get("approval"), seen_at)


async def answer(fut: asyncio.Future[dict[str, Any]], what: str, thread_id: str) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(fut, WAIT_S)
    except TimeoutError:
        raise BenchError(f"thread {thread_id}: no {what} in the outbox after {WAIT_S:.0f}s") from None


async def converse(
    deps: Deps, router: Router, rng: random.Random, opts: Options, *, cycles: int, pause: bool,
    on_cycle: Callable[[], None] = lambda: None, stop: asyncio.Event | None = None,
) -> str:  # fmt: skip
    """Take a new thread through ``cycles`` full approval cycles; with ``pause``, then one more message that
    leaves it waiting on an approval. Returns the thread id."""
    tid = new_id()
    ref = ChannelRef(kind=KIND, address=tid, user=APPROVER)
    for i in range(cycles + int(pause)):
        if stop is not None and stop.is_set():
            break
        asked = router.expect(tid, "approval_request")
        text = message_text(rng, opts.text_bytes)
        if i == 0:
            await control.launch(deps, AGENT, text, ref, thread_id=tid)
        else:
            await control.send(deps, tid, text, ref)
        approval = await answer(asked, "approval request", tid)
        if i == cycles:
            break  # the paused thread: its approval stays open
        replied = router.expect(tid, "text")
        outcome = await control.decide(deps, approval["id"], by=APPROVER, approved=True)
        if outcome.result != "ok":
            raise BenchError(f"thread {tid}: decision refused: {outcome.message}")
        await answer(replied, "reply", tid)
        on_cycle()
    return tid


async def wait_or_fail(tasks: Iterable[asyncio.Task[Any]], seconds: float) -> None:
    """Sleep ``seconds`` but surface at once the first failure among ``tasks``."""
    tasks = list(tasks)
    if not tasks:
        await asyncio.sleep(seconds)
        return
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def finish(tasks: Sequence[asyncio.Task[Any]], timeout: float) -> None:
    """Let tasks end on their own for a while, then cancel the rest; re-raise the first real failure."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError):
            raise r


async def drop_namespace(url: str, ns: str) -> int:
    """Delete every key of the namespace (all Handrail keys start with '<ns>:')."""
    client = aioredis.Redis.from_url(url)
    dropped = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{ns}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                dropped += await client.delete(*batch)
                batch.clear()
        if batch:
            dropped += await client.delete(*batch)
    finally:
        await client.aclose()
    return dropped


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of unsorted ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- 1. throughput ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    cycles_per_s: float
    cycles: int
    window: float
    cpu: str
    worker_problems: int
    worker_log: Path


async def throughput(opts: Options, ns: str) -> Throughput:
    """Closed loop: ``concurrency`` threads each run cycles back to back, as fast as the worker answers."""
    say(f"[throughput] {opts.concurrency} threads in flight, {opts.cycles_per_thread} cycles per thread, "
        f"{opts.warmup:g}s warm-up + {opts.duration:g}s measured ...")  # fmt: skip
    worker = WorkerProcess(opts, ns, profile=opts.profile)
    async with phase(opts, ns, worker) as ph:
        await ph.start_worker()
        deps, loop = ph.deps, asyncio.get_running_loop()
        router, stop, stop_reader = Router(), asyncio.Event(), asyncio.Event()
        reader = ph.spawn(read_outbox(deps.redis, deps.keys.outbox(KIND), router, stop_reader))
        done_at: list[float] = []

        async def conversation(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                await converse(deps, router, rng, opts, cycles=opts.cycles_per_thread, pause=False,
                               on_cycle=lambda: done_at.append(loop.time()), stop=stop)  # fmt: skip

        tasks = [ph.spawn(conversation(opts.seed * 100_003 + i)) for i in range(opts.concurrency)]
        await wait_or_fail([*tasks, reader], opts.warmup)
        meter = CpuMeter(worker.pid, await redis_pid(deps.redis))
        meter.begin()
        t0 = loop.time()
        await wait_or_fail([*tasks, reader], opts.duration)
        t1 = loop.time()
        cpu = meter.end()
        stop.set()  # conversations finish the cycle in flight; the reader must outlive them
        await finish(tasks, WAIT_S)
        stop_reader.set()
        await finish([reader], 5.0)
    cycles = sum(1 for t in done_at if t0 <= t < t1)
    return Throughput(cycles / (t1 - t0), cycles, t1 - t0, cpu, worker.problems(), worker.log_path)


# -- 4. a slow model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlowModel:
    steps_per_s: float
    steps: int
    window: float
    wait_ms: tuple[float, float, float]  # p50, p99, max of a ready thread's wait beyond its own model call
    cpu: str
    worker_problems: int
    worker_log: Path


async def slow_model(opts: Options, ns: str) -> SlowModel:
    """Closed loop: ``slow_threads`` threads each send a message and wait for the answer, which takes a model
    call of ``model_seconds``; a worker that runs threads side by side keeps all of them waiting on the model."""
    say(f"[slow model] {opts.slow_threads} threads in flight, {opts.model_seconds:g}s per model call, "
        f"{opts.warmup:g}s warm-up + {opts.duration:g}s measured ...")  # fmt: skip
    os.environ["BENCH_MODEL_SECONDS"] = str(opts.model_seconds)  # the worker process inherits it
    worker = WorkerProcess(opts, ns)
    async with phase(opts, ns, worker) as ph:
        await ph.start_worker()
        deps, loop = ph.deps, asyncio.get_running_loop()
        router, stop, stop_reader = Router(), asyncio.Event(), asyncio.Event()
        reader = ph.spawn(read_outbox(deps.redis, deps.keys.outbox(KIND), router, stop_reader))
        done: list[tuple[float, float]] = []  # (answered at, wait beyond the model call)

        async def conversation() -> None:
            tid = new_id()
            ref = ChannelRef(kind=KIND, address=tid, user=APPROVER)
            first = True
            while not stop.is_set():
                replied = router.expect(tid, "text")
                sent = loop.time()
                if first:
                    await control.launch(deps, SLOW_AGENT, "hello", ref, thread_id=tid)
                    first = False
                else:
                    await control.send(deps, tid, "and again", ref)
                await answer(replied, "answer", tid)
                now = loop.time()
                done.append((now, now - sent - opts.model_seconds))

        tasks = [ph.spawn(conversation()) for _ in range(opts.slow_threads)]
        await wait_or_fail([*tasks, reader], opts.warmup + opts.model_seconds)
        meter = CpuMeter(worker.pid, await redis_pid(deps.redis))
        meter.begin()
        t0 = loop.time()
        await wait_or_fail([*tasks, reader], opts.duration)
        t1 = loop.time()
        cpu = meter.end()
        stop.set()
        await finish(tasks, WAIT_S)
        stop_reader.set()
        await finish([reader], 5.0)
    waits = [w * 1000 for t, w in done if t0 <= t < t1]
    if not waits:
        raise BenchError("the slow-model phase answered nothing in its window")
    stats = (percentile(waits, 50), percentile(waits, 99), max(waits))
    return SlowModel(len(waits) / (t1 - t0), len(waits), t1 - t0, stats, cpu, worker.problems(), worker.log_path)


def print_profile(path: Path, top: int = 25) -> None:
    import pstats

    say(f"[profile] worker cProfile stats in {path}: top {top} by own time, then Handrail's functions by total")
    say("          (cProfile counts every resumption of a coroutine as a call: trust the times, not the counts)")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"/bot/|/bench/", top)


# -- 2. latency --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    offered_per_s: float
    events: int  # messages and decisions published in the window and committed by the worker
    unmatched: int  # published in the window but never seen handled (should be 0)
    e2e_ms: tuple[float, float, float]  # published -> last commit: p50, p99, max
    service_ms: tuple[float, float, float]  # the worker's own handling: p50, p99, max
    seen_ms: tuple[float, float, float]  # published -> outbox message read by this driver: p50, p99, max
    full_gcs: int  # generation-2 collections in the worker during the window
    longest_gc_ms: float
    cpu: str
    worker_problems: int
    worker_log: Path


@dataclass
class OpenLoop:
    """State of the open-loop offer: which threads can take a decision or a message next."""

    cycles_per_thread: int
    published: dict[str, float] = field(default_factory=dict)  # event key -> entry on the stream (wall clock)
    observed: dict[str, float] = field(default_factory=dict)  # event key -> its outbox message seen (wall clock)
    in_flight: dict[str, str] = field(default_factory=dict)  # thread -> key of the event whose answer is due
    decidable: deque[tuple[str, str]] = field(default_factory=deque)  # (thread, approval id)
    idle: deque[str] = field(default_factory=deque)  # threads that replied and may take another message
    cycles: dict[str, int] = field(default_factory=dict)
    entries_at: list[float] = field(default_factory=list)  # when each inbound entry was published (all types)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever no answer is due

    def on_message(self, thread_id: str, kind: str, approval: dict[str, Any] | None, seen_at: float) -> None:
        if kind not in ("approval_request", "text"):
            return
        key = self.in_flight.pop(thread_id, None)
        if key is not None:
            self.observed[key] = seen_at
        if not self.in_flight:
            self.settled.set()
        if kind == "approval_request" and approval:
            self.decidable.append((thread_id, approval["id"]))
        elif kind == "text":
            self.cycles[thread_id] = n = self.cycles.get(thread_id, 0) + 1
            if n < self.cycles_per_thread:
                self.idle.append(thread_id)


async def latency(opts: Options, ns: str) -> Latency:
    """Open loop at ``rate`` inbound entries/s; per message or decision, the time from its entry being on the
    inbound stream (the publish call returned) to the worker's last commit for it returning (the commit holds
    the log events, the outbox message and the ack). The worker stamps its side through bench.worker's
    timing hook (wall clock, same machine). Also shown: the worker's own handling time (dequeue -> commit,
    no queueing) and the publish -> outbox-message-read time as this driver sees it (includes its own lag).
    """
    say(f"[latency] offering {opts.rate:g} inbound events/s (messages, decisions and launches), "
        f"{opts.warmup:g}s warm-up + {opts.duration:g}s measured ...")  # fmt: skip
    timings = Path(tempfile.gettempdir()) / f"{ns}-timings.json"
    worker = WorkerProcess(opts, ns, timings=timings)
    state = OpenLoop(cycles_per_thread=opts.cycles_per_thread)
    rng = random.Random(opts.seed)
    try:
        async with phase(opts, ns, worker) as ph:
            await ph.start_worker()
            deps, loop = ph.deps, asyncio.get_running_loop()
            stop = asyncio.Event()
            reader = ph.spawn(read_outbox(deps.redis, deps.keys.outbox(KIND), Router(state.on_message), stop))

            async def launch() -> None:
                # control.launch's two publishes, made one by one so each entry has its own publish time
                tid = new_id()
                ref = ChannelRef(kind=KIND, address=tid, user=APPROVER)
                first = ThreadLaunched(thread_id=tid, key=f"launch:{tid}", agent=AGENT, ref=ref)
                await deps.bus.publish(first)
                state.published[first.key] = time.time()
                msg = MessageReceived(thread_id=tid, key=f"msg:{new_id()}", text=message_text(rng, opts.text_bytes),
                                      user=ref.user, ref=ref)  # fmt: skip
                state.in_flight[tid] = msg.key
                await deps.bus.publish(msg)
                state.published[msg.key] = time.time()

            async def send(tid: str) -> None:
                key = f"msg:{new_id()}"
                state.in_flight[tid] = key
                ref = ChannelRef(kind=KIND, address=tid, user=APPROVER)
                await control.send(deps, tid, message_text(rng, opts.text_bytes), ref, key=key)
                state.published[key] = time.time()

            async def decide(tid: str, approval_id: str) -> None:
                key = f"approval:{approval_id}"  # the key approvals.decide gives the decision event
                state.in_flight[tid] = key
                outcome = await control.decide(deps, approval_id, by=APPROVER, approved=True)
                if outcome.result != "ok":
                    raise BenchError(f"thread {tid}: decision refused: {outcome.message}")
                state.published[key] = time.time()

            sent: list[asyncio.Task[None]] = []
            interval = 1.0 / opts.rate
            start = loop.time()
            measure_from, end = start + opts.warmup, start + opts.warmup + opts.duration
            next_at, turn = start, 0
            meter: CpuMeter | None = None
            wall_from = time.time()
            while (now := loop.time()) < end:
                if meter is None and now >= measure_from:
                    meter = CpuMeter(worker.pid, await redis_pid(deps.redis))
                    meter.begin()
                    wall_from = time.time()
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                    continue
                # Alternate decisions and messages; a message goes to an idle thread, else launches a new one.
                turn += 1
                entries = 1
                if state.decidable and (turn % 2 == 0 or not state.idle):
                    coro = decide(*state.decidable.popleft())
                elif state.idle:
                    coro = send(state.idle.popleft())
                else:
                    coro, entries = launch(), 2
                sent.append(ph.spawn(coro))
                state.entries_at.extend([time.time()] * entries)
                next_at += entries * interval  # the schedule is fixed: a late tick is caught up, not skipped
                if len(sent) >= 1000:
                    await wait_or_fail([t for t in sent if t.done()] + [reader], 0)
                    sent = [t for t in sent if not t.done()]
            wall_to = time.time()
            cpu = meter.end() if meter else ""
            await finish(sent, WAIT_S)
            state.settled.clear()
            if state.in_flight:  # let the last answers arrive before the worker stops
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.settled.wait(), WAIT_S)
            stop.set()
            await finish([reader], 5.0)
            worker.stop()  # it writes its timings as it exits
            recorded = json.loads(timings.read_text()) if timings.exists() else {}
    finally:
        timings.unlink(missing_ok=True)

    handled = {key: (began, done) for key, began, done in recorded.get("events", [])}
    full_gcs = [d for gen, t, d in recorded.get("gc", []) if gen == 2 and wall_from <= t < wall_to]
    window = [
        k for k, t in state.published.items()
        if wall_from <= t < wall_to and k.startswith(("msg:", "approval:"))
    ]  # fmt: skip
    e2e, service, seen = [], [], []
    for key in window:
        if key in handled:
            began, done = handled[key]
            e2e.append(1000 * (done - state.published[key]))
            service.append(1000 * (done - began))
        if key in state.observed:
            seen.append(1000 * (state.observed[key] - state.published[key]))
    if not e2e:
        raise BenchError(f"no timed events came back from the worker:\n{worker.log_tail()}")
    if opts.dump:
        dump_latency(opts.dump, window, state, handled, wall_from)

    def stats(xs: list[float]) -> tuple[float, float, float]:
        return (percentile(xs, 50), percentile(xs, 99), max(xs)) if xs else (math.nan,) * 3

    offered = sum(1 for t in state.entries_at if wall_from <= t < wall_to) / (wall_to - wall_from)
    return Latency(
        offered_per_s=offered,
        events=len(e2e),
        unmatched=len(window) - len(e2e),
        e2e_ms=stats(e2e),
        service_ms=stats(service),
        seen_ms=stats(seen),
        full_gcs=len(full_gcs),
        longest_gc_ms=1000 * max(full_gcs, default=0.0),
        cpu=cpu,
        worker_problems=worker.problems(),
        worker_log=worker.log_path,
    )


def dump_latency(
    path: Path, keys: list[str], state: OpenLoop, handled: dict[str, tuple[float, float]], origin: float
) -> None:
    def rel(t: float | None) -> str:
        return "" if t is None else f"{t - origin:.6f}"

    with path.open("w") as f:
        f.write("type,published,began,committed,outbox_read\n")
        for key in sorted(keys, key=state.published.__getitem__):
            began, done = handled.get(key, (None, None))
            kind = key.split(":", 1)[0]
            f.write(f"{kind},{rel(state.published[key])},{rel(began)},{rel(done)},{rel(state.observed.get(key))}\n")


# -- 3. memory ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    threads: int
    paused: int
    events: float  # per thread
    encoded_bytes: float  # per event, as stored in the log
    json_bytes: float  # per event, the compact JSON the codec compresses
    log: float  # MEMORY USAGE per thread, bytes
    approvals: float
    approvals_per_thread: float
    receipts: float
    seen_keys_per_thread: float
    seen_bytes: float  # per thread, estimated from a sample of MEMORY USAGE
    indexes_bytes: float  # thread index + pending-approval index, per thread
    used_delta: float  # used_memory delta / threads

    @property
    def keys_total(self) -> float:
        return self.log + self.approvals + self.receipts


async def used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def quiet_used_memory(deps: Deps) -> int:
    """used_memory with this driver down to one connection: open clients' buffers count in used_memory."""
    await deps.redis.connection_pool.disconnect()
    await asyncio.sleep(0.3)
    return await used_memory(deps.redis)


async def memory(opts: Options, ns: str) -> Memory:
    """Build N threads paused on an approval through real cycles, deliver the outbox as a channel would
    (OutboxConsumer, receipts kept, delivered entries deleted), stop the worker, then measure."""
    n = opts.threads
    say(f"[memory] building {n} threads: {opts.paused_cycles} cycles each, then a message left waiting on its "
        f"approval; {opts.text_bytes}-byte messages ...")  # fmt: skip
    worker = WorkerProcess(opts, ns)
    async with phase(opts, ns, worker, timed=False) as ph:
        deps, router, stop = ph.deps, Router(), asyncio.Event()

        async def deliver(msg: Outbound) -> Receipt:
            router.feed(msg.thread_id, msg.kind, msg.approval, time.time())
            return Receipt(channel_id=f"{KIND}:{msg.thread_id}:{msg.id}")  # what the terminal channel keeps

        consumers = [
            OutboxConsumer(deps.redis, deps.keys, KIND, deliver, consumer=f"c{i}") for i in range(opts.consumers)
        ]
        await consumers[0].ensure_group()
        # Baseline: the inbound streams, their groups and the outbox group exist; no worker, no threads yet.
        before = await quiet_used_memory(deps)
        await ph.start_worker()
        pumps = [ph.spawn(c.run(stop)) for c in consumers]
        tids: list[str] = []
        todo = iter(range(n))  # shared by the builders: each takes the next thread to build

        async def builder(seed: int) -> None:
            rng = random.Random(seed)
            for _ in todo:
                tids.append(await converse(deps, router, rng, opts, cycles=opts.paused_cycles, pause=True))

        builders = [ph.spawn(builder(opts.seed * 7919 + i)) for i in range(min(opts.concurrency, n))]
        t0 = time.monotonic()
        while not all(b.done() for b in builders):
            await wait_or_fail([*builders, *pumps], 1.0)
        await finish(builders, 0)
        built_in = time.monotonic() - t0
        stop.set()
        await finish(pumps, 5.0)
        left = await deps.redis.xlen(deps.keys.outbox(KIND))
        if left:
            raise BenchError(f"{left} outbox messages were not delivered")
        worker.stop()  # its leases and heartbeat go, and its connections close
        after = await quiet_used_memory(deps)
        say(f"[memory] built in {built_in:.1f}s; measuring ...")
        return await measure_threads(deps.redis, deps.keys, tids, (after - before) / n)


async def measure_threads(redis: aioredis.Redis, keys: Keys, tids: list[str], used_delta: float) -> Memory:
    events = encoded = raw = paused = 0
    log_b = approvals_b = receipts_b = approval_count = 0
    for i in range(0, len(tids), 200):
        chunk = tids[i : i + 200]
        pipe = redis.pipeline(transaction=False)
        for tid in chunk:
            pipe.xrange(keys.log(tid))
        logs = await pipe.execute()
        approval_ids: list[list[str]] = []
        for tid, rows in zip(chunk, logs, strict=True):
            ids: list[str] = []
            for _, f in rows:
                blob = f[b"e"]
                ev = codec.decode(blob, tid)
                events += 1
                encoded += len(blob)
                raw += len(json.dumps(codec.event_to_dict(ev), separators=(",", ":")))
                if ev.type == "approval.requested":
                    ids.append(ev.approval_id)
            if rows and codec.decode(rows[-1][1][b"e"], tid).type == "approval.requested":
                paused += 1
            approval_ids.append(ids)
        pipe = redis.pipeline(transaction=False)
        for tid, ids in zip(chunk, approval_ids, strict=True):
            pipe.memory_usage(keys.log(tid), samples=0)
            pipe.memory_usage(keys.receipts(tid), samples=0)
            for a in ids:
                pipe.memory_usage(keys.approval(a), samples=0)
        sizes = iter(await pipe.execute())
        for ids in approval_ids:
            log_b += next(sizes) or 0
            receipts_b += next(sizes) or 0
            for _ in ids:
                approvals_b += next(sizes) or 0
                approval_count += 1
    # Global structures that grow per thread: de-duplication keys, the thread index and the pending index.
    seen_keys = [k async for k in redis.scan_iter(match=keys.seen("*"), count=1000)]
    pipe = redis.pipeline(transaction=False)
    for k in seen_keys[:500]:
        pipe.memory_usage(k, samples=0)
    seen_sample = [s or 0 for s in await pipe.execute()]
    seen_each = sum(seen_sample) / len(seen_sample) if seen_sample else 0.0
    indexes = sum([await redis.memory_usage(k, samples=0) or 0 for k in (keys.threads, keys.pending_approvals)])
    n = len(tids)
    return Memory(
        threads=n,
        paused=paused,
        events=events / n,
        encoded_bytes=encoded / max(events, 1),
        json_bytes=raw / max(events, 1),
        log=log_b / n,
        approvals=approvals_b / n,
        approvals_per_thread=approval_count / n,
        receipts=receipts_b / n,
        seen_keys_per_thread=len(seen_keys) / n,
        seen_bytes=seen_each * len(seen_keys) / n,
        indexes_bytes=indexes / n,
        used_delta=used_delta,
    )


# -- the run -----------------------------------------------------------------------------------------------------


def kb(b: float) -> str:
    return f"{b / 1024:.2f} KB"


async def run(opts: Options) -> bool:
    """Run the chosen phases and print the report; True when every reported figure meets its target."""
    probe = aioredis.Redis.from_url(opts.redis_url)
    try:
        version = (await probe.info("server"))["redis_version"]
    except Exception as exc:
        raise BenchError(f"cannot reach Redis at {opts.redis_url}: {exc}") from None
    finally:
        await probe.aclose()
    base = f"bench-{new_id()}"
    say(f"Handrail approval-cycle benchmark: Redis {version} at {opts.redis_url}, {opts.partitions} partitions, "
        f"1 worker process, {os.cpu_count()} CPUs, namespaces {base}-*")  # fmt: skip
    tp = await throughput(opts, f"{base}-tp") if "throughput" in opts.phases else None
    lat = await latency(opts, f"{base}-lat") if "latency" in opts.phases else None
    mem = await memory(opts, f"{base}-mem") if "memory" in opts.phases else None
    slow = await slow_model(opts, f"{base}-slow") if "slow" in opts.phases else None

    ok = True
    say("")
    say("Results (KB = 1024 bytes)")
    if tp is not None:
        hit = tp.cycles_per_s >= TARGET_CYCLES_PER_S
        ok &= hit
        say(f"1. Throughput, one worker process:                     {tp.cycles_per_s:7.1f} cycles/s"
            f"   (target >= {TARGET_CYCLES_PER_S:g})  {verdict(hit)}")  # fmt: skip
        say(f"   {tp.cycles} cycles in {tp.window:.1f}s, {opts.concurrency} threads in flight; {tp.cpu}")
        if opts.profile:
            say("   (worker ran under cProfile: this figure is not a result)")
    if lat is not None:
        p50, p99, worst = lat.e2e_ms
        hit = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
        ok &= hit
        say(f"2. Framework time per event at {lat.offered_per_s:.0f} events/s offered, inbound entry published -> "
            f"worker's last commit:  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
            f"   (target p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms)  {verdict(hit)}")  # fmt: skip
        s50, s99, smax = lat.service_ms
        o50, o99, _ = lat.seen_ms
        say(f"   {lat.events} messages and decisions timed (max {worst:.2f} ms, {lat.unmatched} unaccounted); "
            f"worker's own handling, dequeue -> commit: p50 {s50:.2f} ms  p99 {s99:.2f} ms  max {smax:.2f} ms; "
            f"published -> outbox message read by the driver: p50 {o50:.2f} ms  p99 {o99:.2f} ms")  # fmt: skip
        say(f"   {lat.cpu}")
        say(f"   worker's full (gen-2) garbage collections in the window: {lat.full_gcs}, longest "
            f"{lat.longest_gc_ms:.1f} ms (the whole event loop stops meanwhile)")  # fmt: skip
    if mem is not None:
        hit_keys = mem.keys_total <= TARGET_BYTES_PER_THREAD
        hit_used = mem.used_delta <= TARGET_BYTES_PER_THREAD
        ok &= hit_keys and hit_used
        say(f"3. Redis memory per paused thread, its keys (MEMORY USAGE):  {kb(mem.keys_total)}"
            f"   (target <= {kb(TARGET_BYTES_PER_THREAD)})  {verdict(hit_keys)}")  # fmt: skip
        say(f"   Redis memory per paused thread, used_memory delta / N:    {kb(mem.used_delta)}"
            f"   (target <= {kb(TARGET_BYTES_PER_THREAD)})  {verdict(hit_used)}")  # fmt: skip
        say(f"   {mem.threads} threads ({mem.paused} paused on an approval), {mem.events:.1f} events each, "
            f"{mem.encoded_bytes:.0f} B per event encoded ({mem.json_bytes:.0f} B as JSON)")  # fmt: skip
        say(f"   keys: log {kb(mem.log)} + {mem.approvals_per_thread:.1f} approval records {kb(mem.approvals)} "
            f"+ receipts {kb(mem.receipts)}; also per thread: {mem.seen_keys_per_thread:.1f} dedupe keys "
            f"~{kb(mem.seen_bytes)}, thread + pending indexes {kb(mem.indexes_bytes)}")  # fmt: skip
    if slow is not None:
        w50, w99, wmax = slow.wait_ms
        hit_steps = slow.steps_per_s >= TARGET_SLOW_STEPS_PER_S
        hit_wait = w99 <= TARGET_READY_WAIT_P99_S * 1000
        ok &= hit_steps and hit_wait
        say(f"4. Slow model ({opts.model_seconds:g}s per call), one worker process:   {slow.steps_per_s:7.1f} "
            f"model steps/s   (target >= {TARGET_SLOW_STEPS_PER_S:g})  {verdict(hit_steps)}")  # fmt: skip
        say(f"   a ready thread's wait beyond its own model call: p50 {w50:.0f} ms  p99 {w99:.0f} ms  "
            f"max {wmax:.0f} ms   (target p99 <= {TARGET_READY_WAIT_P99_S * 1000:.0f} ms)  {verdict(hit_wait)}")
        say(f"   {slow.steps} answers in {slow.window:.1f}s, {opts.slow_threads} threads in flight; {slow.cpu}")
    for name, res in (("throughput", tp), ("latency", lat), ("slow model", slow)):
        if res is not None and res.worker_problems:
            say(f"   warning: the {name} worker logged {res.worker_problems} warnings/errors: {res.worker_log}")
    if tp is not None and opts.profile:
        print_profile(opts.profile)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        ok = asyncio.run(run(opts))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 1 if opts.strict and not ok else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
