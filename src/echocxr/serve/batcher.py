"""Dynamic batching: one worker thread owns the backend and decodes compatible requests together.

Grouping rule: two requests share a decode batch when their `DecodeConfig`s are equal apart from
`max_new_tokens` and `seed` (same decoder, block size, steps, strategy, threshold, fusion,
temperature, top-k, top-p), their studies have the same number of images and the same language
(so prompts are identical but for the image pixels: no row is padded). Each row stops at its own
`max_tokens` and samples from its own generator seeded with its own seed, so a row's output does
not depend on its batch-mates (tests/test_serve.py checks this under load at temperature 0, and
for seeded sampling).

Scheduling: the oldest waiting request opens a batch; the worker waits until `max_batch`
compatible requests are queued or the oldest has waited `max_wait_ms`, then decodes them.
Incompatible requests keep their place for a later batch (FIFO among batches).

Every accepted job gets exactly one terminal event: `Done` or `Failed`. A batch that raises before
any of its rows committed a token is decoded again one job at a time, so one bad request fails
alone. `close()` stops accepting and, by default, drains the queue before the worker exits.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from echocxr.serve.backend import RowEvent, RowResult


class QueueFull(Exception):
    """The queue holds `max_queue` requests already (the caller answers 503)."""


class Closed(Exception):
    """The batcher is shutting down and accepts no new requests (the caller answers 503)."""


@dataclass
class Delta:
    tokens: list[int]
    forwards: int
    elapsed_ms: float  # since this job's batch started decoding


@dataclass
class Done:
    result: RowResult
    queue_ms: float
    batch_size: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """One request's study. `sink` receives Delta* then exactly one Done or Failed; the worker
    calls it from its own thread, so it must be thread-safe (the app posts to the event loop)."""

    example: object  # backend.Row: the study as a one-row batch
    cfg: object  # DecodeConfig; its max_new_tokens and seed are this row's own
    sink: Callable[[object], None]
    n_images: int = 1
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        # the grouping rule (module docstring): equal configs but for max_new_tokens and seed, equal prompts
        self.key = (replace(self.cfg, max_new_tokens=1, seed=0), self.n_images, self.example.language)


class Batcher:
    """Queue + one decode thread. `submit` from any thread; `start`, `close` from the owner.

    on_batch(size) is called before each batch is decoded (metrics)."""

    def __init__(
        self,
        backend,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.backend, self.max_batch, self.max_wait = backend, max_batch, max_wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch or (lambda n: None)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="echocxr-decode", daemon=True)
        self._thread.start()

    def submit(self, *jobs: Job) -> None:
        """Queue all `jobs` (the n choices of one request) or none: raises QueueFull or Closed;
        otherwise each job will get exactly one terminal event."""
        with self._cv:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (limit {self.max_queue})")
            self._queue.extend(jobs)
            self._cv.notify_all()

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting. drain=True: decode what is queued first; False: fail it."""
        with self._cv:
            self._closing = True
            if not drain:
                while self._queue:
                    self._queue.popleft().sink(Failed("the server shut down before this request ran"))
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch, or None when closing with an empty queue."""
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while not self._closing:
                same = sum(1 for j in self._queue if j.key == first.key)
                left = deadline - time.perf_counter()
                if same >= self.max_batch or left <= 0:
                    break
                self._cv.wait(left)
            group, rest = [], deque()
            for j in self._queue:
                (group if j.key == first.key and len(group) < self.max_batch else rest).append(j)
            self._queue = rest
            return group

    def _run(self) -> None:
        while (group := self._take()) is not None:
            group = [j for j in group if not j.cancelled.is_set()]  # timed out while queued
            if group:
                self._decode(group)

    def _decode(self, group: list[Job]) -> None:
        """Decode one group; each job gets its `Done` on its row's finished event, so a row that
        ends early is answered before its batch-mates finish (and the engine stops computing it:
        `decode.engine.Run.forward`)."""
        started = time.perf_counter()
        self.on_batch(len(group))
        answered = [False] * len(group)
        heard = [False]  # has any row been sent an event?

        def on_event(ev: RowEvent) -> None:
            job = group[ev.row]
            heard[0] = True
            if ev.tokens:
                job.sink(Delta(ev.tokens, ev.forwards, ev.elapsed_ms))
            if ev.result is not None and not answered[ev.row]:
                answered[ev.row] = True
                job.sink(Done(ev.result, (started - job.enqueued) * 1000, len(group)))

        try:
            results = self.backend.decode(
                [j.example for j in group],
                group[0].cfg,
                [j.cfg.max_new_tokens for j in group],
                on_event,
                seeds=[j.cfg.seed for j in group],
            )
        except Exception as e:  # one bad batch must not stop the server; every open row hears why
            if len(group) > 1 and not heard[0]:  # nothing sent yet: find the culprit row by row
                for j in group:
                    if not j.cancelled.is_set():
                        self._decode([j])
                return
            msg = f"decoding failed: {type(e).__name__}: {e}"
            for j, done in zip(group, answered, strict=True):
                if not done:
                    j.sink(Failed(msg))
            return
        for i, (j, r) in enumerate(zip(group, results, strict=True)):
            if not answered[i]:  # the backend reports every finish; this is a safety net
                j.sink(Done(r, (started - j.enqueued) * 1000, len(group)))
