"""Torch work of long-lived request threads must not slow the generator's thread pool."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from retrieval.compute_thread import run_in_own_thread

ROOT = Path(__file__).resolve().parent.parent


def test_run_in_own_thread_returns_the_result_from_another_thread():
    caller = threading.get_ident()
    assert run_in_own_thread(lambda: threading.get_ident()) != caller
    assert run_in_own_thread(lambda: 41 + 1) == 42


def test_run_in_own_thread_raises_the_callees_exception_in_the_caller():
    def fail() -> None:
        raise ValueError("bad input 7")

    with pytest.raises(ValueError, match="bad input 7"):
        run_in_own_thread(fail)


# A "model thread" runs 2,000 small parallel regions before and after a long-lived
# "request thread" embeds a query. When libgomp throttles (it manages more threads than
# there are CPUs), the model thread's workers sleep between regions: one voluntary
# context switch per region. Run in a fresh interpreter: no thread of this test process
# may have started an OpenMP pool before.
SCRIPT = textwrap.dedent(
    """
    import queue, resource, threading
    import torch
    from ingest.embed import load_embedder

    embedder = load_embedder("all-minilm-l6-v2")

    def switches_during_parallel_work():
        x = torch.ones(1 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        for _ in range(2000):
            x.sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before

    jobs, done = queue.Queue(), queue.Queue()

    def request_thread():
        while True:
            done.put(jobs.get()())

    threading.Thread(target=request_thread, daemon=True).start()

    def model_thread():
        print(switches_during_parallel_work())
        jobs.put(lambda: embedder.embed(["where do glaciers carve valleys?"] * 4))
        done.get()
        print(switches_during_parallel_work())

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    """
)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread: no pool to throttle")
def test_embedding_on_a_long_lived_thread_leaves_decode_thread_pool_spinning():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (int(line) for line in out.stdout.split())
    # Unthrottled: a handful of switches. Throttled: about one per region (3,900 measured).
    assert before < 200, f"the pool was throttled before any embedding ({before} switches)"
    assert after < 200, f"embedding on a request thread throttled the pool ({after} switches)"
