"""What the CPU benchmarks share: glibc's allocator settings, the clock option, a median timer.

Imported by the scripts beside it (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

#: glibc's thresholds raised to 1 GiB: large temporaries stay mapped instead of page-faulting on
#: every call, which makes eager float times swing (the benchmarks' ratios are paired anyway)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def with_malloc_thresholds() -> None:
    """Re-execute this script with :data:`MALLOC` in the environment, unless it already is
    (glibc reads them at start-up only)."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def add_clock_option(parser: argparse.ArgumentParser, default: str = "wall") -> None:
    """``--clock wall|cpu`` (read it with :func:`clock`)."""
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=default,
        help="cpu: this process's CPU time (time.process_time), robust to other jobs on a busy "
        "machine; meaningful with --threads 1",
    )


def clock(name: str) -> Callable[[], float]:
    """The timer of ``--clock``: ``time.process_time`` for ``cpu``, else ``time.perf_counter``."""
    return time.process_time if name == "cpu" else time.perf_counter


def median_ms(
    fn: Callable[[], object], reps: int, timer: Callable[[], float], warmup: int = 0
) -> float:
    """The median of ``reps`` timed calls of ``fn`` (after ``warmup`` untimed ones), in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = timer()
        fn()
        times.append(timer() - start)
    return 1000 * statistics.median(times)
