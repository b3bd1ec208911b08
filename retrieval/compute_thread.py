"""Run torch work of request and worker threads on a thread that ends with the call.

The generator decodes on one long-lived thread whose OpenMP workers spin between the
~300 small parallel regions of a decode step. libgomp keeps a pool of workers for every
thread that has started a parallel region, until that thread exits, and once it manages
more threads than there are CPUs it makes all of them sleep between regions instead
(GOMP's "throttled" spin count). So one query embedded on a web server's long-lived
worker thread made every later decode step of the 0.5B model 15% slower (38.6 -> 44.4 ms
at best, 12,500 voluntary context switches per 40 steps instead of 1). A thread that
exits takes its pool with it; the cost is one thread start per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[[], T], name: str = "ragqa-compute") -> T:
    """fn() on a new thread, joined before returning; its exception is raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller, re-raised there
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
