"""``handrail worker`` with optional instruments, for the benchmark: ``python -m bench.worker``.

BENCH_TIMINGS=FILE  record, per inbound entry, its idempotency key and wall-clock times when the worker began
                    handling it and when its last commit returned, and every cyclic-GC pass (a pause of the
                    whole event loop); written to FILE as JSON on exit.
BENCH_PROFILE=FILE  run the worker under cProfile and dump the stats to FILE on exit.
BENCH_GC_OFF=1      disable the cyclic garbage collector (an experiment, to see how much of the latency tail
                    its pauses make; e.g. ``BENCH_GC_OFF=1 python -m bench.cycles --phases latency``).

These wrap the runtime from outside (nothing under bot/ changes); without them this is plain ``handrail worker``.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import time
from typing import Any

Sample = tuple[str, float, float]  # (event key, handling began, last commit returned), time.time() seconds
GcPass = tuple[int, float, float]  # (generation, began, duration), seconds


def install_gc_probe(passes: list[GcPass]) -> None:
    """Record each collection of the cyclic garbage collector: while it runs, no event makes progress."""
    began = [0.0, 0.0]  # wall clock, perf counter

    def probe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[:] = [time.time(), time.perf_counter()]
        else:
            passes.append((info["generation"], began[0], time.perf_counter() - began[1]))

    gc.callbacks.append(probe)


def install_timing(samples: list[Sample]) -> None:
    """Time ``Worker._handle`` (decode -> apply -> fenced commits incl. the ack) per entry.

    The key is caught in ``Worker.apply``, which sees the decoded event; the entry id in its ack command ties
    the two calls together. Wall-clock time (not a monotonic clock) so the driver process can compare.
    """
    from bot.worker import Worker

    handle, apply = Worker._handle, Worker.apply
    seen: dict[tuple[str, bytes], str] = {}  # (stream, entry id) -> event key, while the entry is handled

    async def timed_apply(self: Worker, p: int, token: str, event: Any, ack: Any, *rest: Any) -> None:
        seen[(ack[0][1], ack[0][3])] = event.key
        await apply(self, p, token, event, ack, *rest)

    async def timed_handle(
        self: Worker, p: int, token: str, stream: str, entry_id: bytes, fields: Any, *rest: Any
    ) -> bool:
        began = time.time()
        ok = await handle(self, p, token, stream, entry_id, fields, *rest)
        done = time.time()
        key = seen.pop((stream, entry_id), None)
        if ok and key:
            samples.append((key, began, done))
        return ok

    Worker._handle = timed_handle  # type: ignore[method-assign]
    Worker.apply = timed_apply  # type: ignore[method-assign]


def main() -> None:
    from bot.cli import cli

    samples: list[Sample] = []
    passes: list[GcPass] = []
    timings, profile_path = os.environ.get("BENCH_TIMINGS"), os.environ.get("BENCH_PROFILE")
    if timings:
        install_timing(samples)
        install_gc_probe(passes)
    if os.environ.get("BENCH_GC_OFF"):
        gc.disable()
    profiler = cProfile.Profile() if profile_path else None
    try:
        if profiler:
            profiler.enable()
        cli.main(["worker"], prog_name="handrail", standalone_mode=False)
    finally:
        if profiler and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        if timings:
            with open(timings, "w") as f:
                json.dump({"events": samples, "gc": passes}, f)


if __name__ == "__main__":
    main()
