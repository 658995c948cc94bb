"""`Prefetcher`: a daemon thread that keeps a queue of the next training batches of a `RaySampler`.

`next(prefetcher)` returns `sampler.get_train_batch(start_step)`, then `start_step + 1`, ... The thread starts
lazily on the first `next()`, so `set_start_step(step)` may be called until then (to resume). Since each batch
is a pure function of (seed, step, rank), running ahead never changes what a resumed run sees.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref

from mipnerf360 import utils
from mipnerf360.datasets.sampler import RaySampler

_LIVE: 'weakref.WeakSet[Prefetcher]' = weakref.WeakSet()


@atexit.register
def _stop_all_threads():
    """Stops the threads before the interpreter shuts down (a daemon thread killed in the middle of a torch op
    aborts the process)."""
    for prefetcher in list(_LIVE):
        prefetcher.close()


class Prefetcher:
    """Training batches of `sampler` for steps `start_step, start_step + 1, ...`, computed `queue_size` ahead."""

    def __init__(self, sampler: RaySampler, start_step: int = 0, queue_size: int = 3):
        self.sampler = sampler
        self._queue: 'queue.Queue' = queue.Queue(queue_size)
        self._next_step = int(start_step)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = False
        self._start_lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def size(self) -> int:
        return self.sampler.size

    @property
    def camtype(self):
        return self.sampler.camtype

    @property
    def cameras(self):
        return self.sampler.cameras

    @property
    def scene(self):
        return self.sampler.scene

    def set_start_step(self, step: int):
        """Makes the first `next()` return the batch of `step` (call before the first `next()`)."""
        if self._started:
            raise RuntimeError('set_start_step() must be called before the first next() of the prefetcher.')
        self._next_step = int(step)

    def peek(self) -> utils.Batch:
        """The batch the next `next()` will return, without consuming it."""
        return self.sampler.get_train_batch(self._next_step)

    def _run(self):
        step = self._next_step
        while not self._stop.is_set():
            try:
                item = (step, self.sampler.get_train_batch(step))
            except BaseException as e:  # pylint: disable=broad-except
                item = (step, e)  # Re-raised by next() instead of leaving it blocked on an empty queue.
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> utils.Batch:
        with self._start_lock:
            if not self._started:
                self._started = True
                _LIVE.add(self)
                self._thread.start()
        step, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        self._next_step = step + 1
        return batch

    def close(self, timeout: float = 5.):
        """Stops the thread (if running); the sampler stays usable."""
        self._stop.set()
        if self._started and self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> 'Prefetcher':
        return self

    def __exit__(self, *exc):
        self.close()
