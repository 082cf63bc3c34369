"""Serving one model to many requests: a single inference thread fed by a queue.

CPU inference would block the event loop, and a llama.cpp context holds one KV cache that two
generations must not interleave on; so every generation runs on one dedicated thread, one at a
time, in arrival order. The web layer submits a :class:`Job` and reads its steps from an
asyncio queue. Leaving that read early (a client that went away) cancels the job: a queued job
is then dropped without being computed, a running one stops before its next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ..openai_api import Counters, Sampling
from .generation import GenerationResult, Model, Step, generate

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stats(Counters):
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    tokens_generated: int = 0
    requests_total: int = 0
    requests_cancelled: int = 0
    open_requests: int = 0  # submitted and not yet finished or dropped


class _Finished:
    """End-of-job marker on a job's event queue."""


_FINISHED = _Finished()


class Job:
    """One generation request travelling from the event loop to the worker thread and back."""

    def __init__(self, prompt: Sequence[int], sampling: Sampling,
                 loop: asyncio.AbstractEventLoop, *, stream: bool = True) -> None:
        self.prompt = list(prompt)
        self.sampling = sampling
        # A non-streamed job reports only its end: waking the event loop for every token
        # costs CPU that the inference threads need (measured ~25% slower on 2 cores).
        self.stream = stream
        self.outcome = GenerationResult()
        self._loop = loop
        self._events: asyncio.Queue[Step | _Finished | BaseException] = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def steps(self) -> AsyncIterator[Step]:
        """The job's steps as the worker produces them; engine errors are raised here.

        Leaving early (closing the iterator, or cancelling the task reading it) cancels the job.
        """
        try:
            while True:
                event = await self._events.get()
                if isinstance(event, _Finished):
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            self.cancel()  # no-op for a job that already finished

    def _post(self, item: Step | _Finished | BaseException) -> bool:
        """Hand an event to the event loop; False when the loop is gone (server stopping)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:
            self.cancel()
            return False
        return True


class Worker:
    """The inference thread of one model, with the server's counters."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.stats = Stats()
        self._lock = threading.Lock()  # counters change on both threads
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closing = threading.Event()

    def submit(self, prompt: Sequence[int], sampling: Sampling, *, stream: bool = True) -> Job:
        """Queue a generation; read it with :meth:`Job.steps` (which yields nothing for a job
        that does not stream: its steps are in ``job.outcome``). Call on the event loop."""
        job = Job(prompt, sampling, asyncio.get_running_loop(), stream=stream)
        self._ensure_thread()
        with self._lock:
            self.stats.requests_total += 1
            self.stats.open_requests += 1
        self._jobs.put(job)
        return job

    def reset_stats(self) -> None:
        with self._lock:  # the inference thread counts too
            self.stats.reset()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: the running job stops at its next token, queued ones are dropped."""
        thread = self._thread
        if thread is None:
            return
        self._closing.set()
        self._jobs.put(None)
        thread.join(timeout)
        self._thread = None
        self._closing.clear()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="local-upstream-engine",
                                                daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._drain()
                return
            self._run(job)

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            job.cancel()
            self._finish(job, completed=False)
            job._post(_FINISHED)

    def _run(self, job: Job) -> None:
        if self._closing.is_set():
            job.cancel()
        if job.cancelled:  # the client left while the job waited: do not compute it
            self._finish(job, completed=False)
            job._post(_FINISHED)  # its handler may still be waiting
            return
        outcome = job.outcome
        error: BaseException | None = None
        generated = 0
        try:
            for step in generate(self.model, job.prompt, job.sampling, outcome,
                                 lambda: job.cancelled or self._closing.is_set()):
                if generated == 0:
                    self._count_prompt(outcome)
                generated += 1
                with self._lock:
                    self.stats.tokens_generated += 1
                if job.stream and not job._post(step):
                    break
        except Exception as exc:  # reported to the request, the thread serves on
            log.exception("generation failed")
            error = exc
        if generated == 0 and outcome.prompt_tokens:
            self._count_prompt(outcome)  # max_tokens 0, or cancelled before the first token
        # An engine error is not a cancellation; a generation left unfinished without one is.
        self._finish(job, completed=outcome.finish_reason is not None or error is not None)
        job._post(error if error is not None else _FINISHED)

    def _count_prompt(self, outcome: GenerationResult) -> None:
        with self._lock:
            self.stats.prompt_tokens_evaluated += outcome.prompt_evaluated
            self.stats.prompt_tokens_reused += outcome.prompt_reused

    def _finish(self, job: Job, *, completed: bool) -> None:
        with self._lock:
            self.stats.open_requests -= 1
            if not completed:
                self.stats.requests_cancelled += 1
