"""Running the demo's jobs: in this process, or on worker processes of one thread each."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

from .settings import Log


@dataclass
class Job:
    name: str
    run: Callable  # a module-level function (a worker process imports it), called with *args, log
    args: tuple
    after: tuple[str, ...] = ()
    then: Callable[[object], None] | None = None  # in this process, with the result; may add jobs


_worker_queue = None


def _init_worker(queue, threads: int) -> None:
    import signal

    import torch

    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)
    # Ctrl-C goes to the whole process group; the demo's process answers it and stops the
    # workers, so a worker printing its own KeyboardInterrupt would only add noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_log(message: str) -> None:
    _worker_queue.put(message)


def cores() -> int:
    """The cores this process may run on (a container's share, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Two jobs at once where there are two cores: the testbed's small matrices keep a second
    thread of one job half idle (a training step runs 1.3-1.5x faster on two threads than on
    one), while two one-thread jobs run side by side at full speed each."""
    return 2 if cores() >= 2 else 1


# One function: the scheduling loop and the clean-up on failure share the pool and the running set.
def run_jobs(jobs: list[Job], workers: int, log: Log) -> dict[str, object]:
    """Run `jobs` (in priority order: a free worker takes the first whose `after` are done;
    emptied as they start) and return their results by name. With one worker they run here."""
    results: dict[str, object] = {}
    pending = jobs  # the same list: a job's `then` appends the jobs its result makes possible

    def ready() -> Job | None:
        job = next((j for j in pending if all(a in results for a in j.after)), None)
        if job is not None:
            pending.remove(job)
        return job

    def finish(job: Job, result) -> None:
        results[job.name] = result
        if job.then is not None:
            job.then(result)  # may append to `pending`

    if workers <= 1:
        while pending:
            job = ready()
            if job is None:
                raise RuntimeError(f"demo jobs wait on each other: {[j.name for j in pending]}")
            finish(job, job.run(*job.args, log))
        return results

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    # a SimpleQueue writes each line into the pipe before `put` returns (a Queue hands it to a
    # feeder thread), so a job's lines are readable here before its result is
    messages = context.SimpleQueue()

    def drain() -> None:
        while not messages.empty():
            log(messages.get())

    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(messages, max(1, cores() // workers)))
    running: dict = {}
    try:
        while pending or running:
            while len(running) < workers and (job := ready()) is not None:
                # a copy now: the pool pickles arguments later, in a thread of its own, while a
                # `then` here may be adding to a dict they share (the testbed's paths)
                running[pool.submit(job.run, *copy.deepcopy(job.args), _worker_log)] = job
            if not running:
                raise RuntimeError(f"demo jobs wait on each other: {[j.name for j in pending]}")
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                finish(running.pop(future), future.result())  # a job's error is raised here
        drain()
        pool.shutdown()
    except BaseException:
        # stop the other jobs now rather than after their minutes of training: every output
        # they write goes to the cache atomically, so nothing half-written is left to reuse
        pool.shutdown(wait=False, cancel_futures=True)
        for child in set(multiprocessing.active_children()) - before:  # this pool's workers only
            child.terminate()
        raise
    return results
