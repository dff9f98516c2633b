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
    """Time ``Worker._process`` (apply one inbound entry -> the turn -> fenced commits incl. the ack) per entry.

    Wall-clock time (not a monotonic clock) so the driver process can compare.
    """
    from bot.worker import Worker, _Done

    process = Worker._process

    async def timed_process(self: Worker, lane: Any, item: Any) -> Any:
        began = time.time()
        result = await process(self, lane, item)
        if isinstance(result, _Done) and item.event.key:
            samples.append((item.event.key, began, time.time()))
        return result

    Worker._process = timed_process  # type: ignore[method-assign]


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
    profiler = cProfile.Profile(time.process_time) if profile_path else None  # CPU time: the machine is shared
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
