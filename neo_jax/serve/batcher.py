"""Dynamic batching: concurrent requests wait in a queue; one worker thread decodes them together.

    batcher = Batcher(run, max_batch=16, max_wait_s=0.01, start=engine.warm_up)
    batcher.start()
    future = batcher.submit(key, payload)  # a concurrent.futures.Future of `run`'s answer for it
    batcher.stop()

The worker first calls `start` (the warm-up) and sets `warm`; then it loops: it waits for a
request, collects more until it holds `max_batch` or `max_wait_s` has passed since the first,
and calls `run(payloads)` once per key among them (keys in order of arrival; `run` answers a
list of payloads with the list of their answers). A call that raises is retried one payload at
a time, so a bad payload fails alone, its exception set on its future. A future cancelled
before its call (the client went away) is skipped.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

_STOP = object()


@dataclasses.dataclass(frozen=True)
class _Job:
    key: Hashable
    payload: Any
    future: Future


class Batcher:
    def __init__(self, run: Callable[[list], Sequence], max_batch: int, max_wait_s: float,
                 start: Callable[[], object] = lambda: None):
        self._run, self._start = run, start
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="neo-jax-batcher", daemon=True)
        self.warm = threading.Event()  # set once `start` has returned or raised
        self.failure: BaseException | None = None  # what `start` raised

    @property
    def ready(self) -> bool:
        return self.warm.is_set() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def submit(self, key: Hashable, payload: Any) -> Future:
        future: Future = Future()
        self._queue.put(_Job(key, payload, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests already drained, then end the worker. A worker still warming up is not
        waited for: it ends after its warm-up (a daemon thread, it does not hold the process)."""
        self._queue.put(_STOP)
        if self.warm.is_set() and self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        try:
            self._start()
        except BaseException as error:  # reported through `failure`; the server decides what follows
            self.failure = error
            return
        finally:
            self.warm.set()
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, deadline = [first], time.monotonic() + self.max_wait_s
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                jobs.append(job)
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._deliver(group)

    def _deliver(self, jobs: list[_Job]) -> None:
        try:
            answers = self._run([job.payload for job in jobs])
        except Exception as error:  # a bad payload, or a failure of the decoder: its futures carry it
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
            else:
                for job in jobs:
                    self._deliver([job])
            return
        for job, answer in zip(jobs, answers):
            job.future.set_result(answer)
