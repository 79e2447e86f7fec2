"""Work in a thread whose error reaches the thread that waits for it (`Background`), and the polling wait of a rank
for rank 0 (`wait_while_held`), for work that no collective may wait on."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from saetool.util.lock import owner_gone

POLL_FIRST, POLL_MAX = 0.01, 0.5  # seconds slept between two tries of a wait: doubling from the first to the max


def wait_while_held(done: Callable[[], bool], folder: str | os.PathLike, owner: dict | None, what: str) -> None:
    """Poll `done()`, with a bounded sleep between tries (POLL_FIRST doubling up to POLL_MAX), until it is true, as
    long as the run `owner` (rank 0's lock record, `lock_owner`) holds `folder`'s lock: how a rank waits for rank 0's
    unbounded work (a report, a checkpoint write) outside any collective, so no collective timeout limits it.
    ValueError (one line, naming `what`) once rank 0 let go of the lock or died without `done()`."""
    sleep = POLL_FIRST
    while True:
        reason = owner_gone(folder, owner)  # before `done()`: rank 0 may finish and leave in between
        if done():
            return
        if reason is not None:
            raise ValueError(f"stopped waiting for {what}: {reason}")
        time.sleep(sleep)
        sleep = min(POLL_MAX, 2 * sleep)


def injected_delay(name: str) -> None:
    """Sleep SAETOOL_TEST_DELAY_<NAME> seconds (unset: not at all). Tests only: they make rank 0's work (tokens,
    finish, checkpoint) slower than the collective timeout, to show that no other rank waits for it in a collective."""
    seconds = float(os.environ.get(f"SAETOOL_TEST_DELAY_{name.upper()}", "0"))
    if seconds > 0:
        time.sleep(seconds)


class Background:
    """`fn(*args, stop=event, **kwargs)` running in a daemon thread named `name`, started at once.

    `check()` re-raises fn's error in the calling thread (it returns None while fn runs or after fn returned, so a
    poll may ask it between reads), `result()` waits for fn and returns its value or raises its error, `close()`
    sets `stop` (fn should end soon after, e.g. after its current piece of work) and waits for it."""

    def __init__(self, fn: Callable, *args, name: str = "saetool-background", **kwargs):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.value = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        try:
            self.value = fn(*args, stop=self.stop, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread by check() / result()
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def result(self):
        self.thread.join()
        self.check()
        return self.value

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
