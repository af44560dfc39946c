"""Dynamic batching: one worker thread owns the model and answers queued requests in padded batches.

Requests (`Job`) wait in a bounded queue. The worker takes the first, keeps collecting for
``window_s`` seconds or until it holds ``max_batch_size`` jobs, and answers them with one call of
`hcx_extend.inference.answer`, so requests that arrive together share one ``generate``. Requests
that arrive while a batch is being generated wait and form the next batch.

Batches are grouped by generation settings: only jobs with equal `GenerationSettings` (max tokens,
temperature, top_p, stop strings, seed) share a ``generate`` call; a collected window with several
settings runs one call per group, in order of arrival. (The other choice, generating with the
largest ``max_tokens`` and cutting each answer, would need token-exact cuts that `answer` does not
expose, and would spend time on tokens nobody asked for.)

The worker reports to each job through its ``deliver`` callable, from the worker thread, in order:
`Started` (the job passed its checks and is being generated), any number of `TextDelta` (only for
jobs that stream), then `Finished` or `Failed`. `Inbox` carries these events onto an asyncio loop.

Each job is checked alone before its batch is built, so a request the processor refuses fails by
itself (a 400) instead of failing the requests batched with it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from hcx_extend.data.examples import gather_inputs
from hcx_extend.inference import Answer, GenerationSettings, answer
from hcx_extend.model import OmniForCausalLM
from hcx_extend.processor import OmniProcessor
from hcx_extend.serve.content import Prompt
from hcx_extend.serve.protocol import APIError, invalid_request

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Started:
    """The job is in a batch of ``batch_size`` jobs that is being generated now."""

    batch_size: int


@dataclass(frozen=True)
class TextDelta:
    """New answer text (streaming jobs only); may contain a stop string that the answer will not."""

    text: str


@dataclass(frozen=True)
class Finished:
    answer: Answer


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Union[Started, TextDelta, Finished, Failed]


@dataclass(eq=False)
class Job:
    """One request waiting for its answer.

    Attributes:
        prompt: the chat and its modality items.
        settings: how to generate (jobs are batched with jobs of equal settings).
        deliver: receives this job's events; called from the worker thread.
        streams: whether the job wants `TextDelta` events.
        cancelled: set by the requester (timed out, client gone); the worker drops a cancelled job that
            has not started and stops delivering text to one that has.
    """

    prompt: Prompt
    settings: GenerationSettings
    deliver: Callable[[Event], None]
    streams: bool = False
    cancelled: bool = False


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already."""


class WorkerClosed(Exception):
    """The worker is closing (the server is shutting down) and takes no more jobs."""


Generate = Callable[..., list[Answer]]


@dataclass
class BatchStats:
    """What the worker has done: for ``/health`` and for tests that check that requests were batched."""

    batches: int = 0
    requests: int = 0
    failed: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    in_flight: int = 0

    def as_dict(self, queued: int) -> dict[str, Any]:
        return {"queued": queued, "in_flight": self.in_flight, "batches": self.batches, "requests": self.requests,
                "failed": self.failed, "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}


_STOP = object()


class BatchWorker:
    """The thread that owns the model.

    Args:
        model, processor: what `answer` needs.
        max_batch_size: the most jobs in one ``generate`` call.
        window_s: how long to wait for more jobs after the first one arrives.
        max_queue: the most jobs waiting (not yet taken into a batch); `submit` raises `QueueFull` beyond.
        generate: the function answering a batch (default `hcx_extend.inference.answer`; tests pass a stand-in).
    """

    def __init__(self, model: OmniForCausalLM, processor: OmniProcessor, *, max_batch_size: int = 32,
                 window_s: float = 0.01, max_queue: int = 64, generate: Generate = answer):
        if max_batch_size < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"max_batch_size and max_queue must be >= 1 and window_s >= 0, got {max_batch_size}, "
                             f"{max_queue}, {window_s}")
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.generate = generate
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stats = BatchStats()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hcx-batch-worker", daemon=True)

    # ------------------------------------------------------------------ the requester's side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises `QueueFull` or `WorkerClosed` instead of waiting."""
        with self._lock:
            if self._closed:
                raise WorkerClosed()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull() from None

    def close(self, timeout: float | None = None) -> bool:
        """Take no more jobs, answer those already queued, stop the thread. Returns whether it stopped in time."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already and self._thread.is_alive():
            self._queue.put(_STOP)  # behind every queued job: they are answered first
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.as_dict(queued=self._queue.qsize())

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
            for group in _group_by_settings([j for j in jobs if not j.cancelled]):
                self._answer(group)

    def _answer(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if self._check(job)]
        if not jobs:
            return
        with self._lock:
            self._stats.in_flight = len(jobs)
        for job in jobs:
            job.deliver(Started(batch_size=len(jobs)))
        inputs = gather_inputs([job.prompt for job in jobs])

        def on_text(row: int, text: str) -> None:
            job = jobs[row]
            if job.streams and not job.cancelled:
                job.deliver(TextDelta(text))

        streaming = any(job.streams for job in jobs)
        try:
            answers = self.generate(self.model, self.processor, [job.prompt.chat for job in jobs], inputs,
                                    jobs[0].settings, on_text=on_text if streaming else None)
        except Exception as error:  # noqa: BLE001 - the worker must outlive any one batch
            log.exception("generating a batch of %d failed", len(jobs))
            failure = APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error",
                               code="generation_failed")
            self._record(len(jobs), failed=len(jobs))
            for job in jobs:
                job.deliver(Failed(failure))
            return
        self._record(len(jobs))
        for job, result in zip(jobs, answers):
            job.deliver(Finished(result))

    def _check(self, job: Job) -> bool:
        """Build the job's batch alone; a job the processor refuses fails by itself."""
        try:
            self.processor([job.prompt.chat], job.prompt.inputs)
        except Exception as error:  # noqa: BLE001 - ValueError, or the chat template's own error
            with self._lock:
                self._stats.failed += 1
            job.deliver(Failed(invalid_request(f"the chat could not be prepared: {error}")))
            return False
        return True

    def _record(self, size: int, failed: int = 0) -> None:
        with self._lock:
            self._stats.batches += 1
            self._stats.requests += size
            self._stats.failed += failed
            self._stats.batch_sizes[size] += 1
            self._stats.in_flight = 0


def _group_by_settings(jobs: list[Job]) -> list[list[Job]]:
    groups: dict[GenerationSettings, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.settings, []).append(job)
    return list(groups.values())


# ---------------------------------------------------------------------------------------- the loop's side
class Inbox:
    """A job's events, delivered from the worker thread and awaited on an asyncio loop.

    ``Job(..., deliver=inbox.deliver)``; then ``await inbox.next(timeout)`` on the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def next(self, timeout: float) -> Event:
        """The next event; raises TimeoutError after ``timeout`` seconds (<= 0: only what already came)."""
        return await asyncio.wait_for(self._events.get(), timeout=max(timeout, 0.0))
