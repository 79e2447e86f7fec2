"""Work in a thread whose error reaches the thread that waits for it: `Background`."""

from __future__ import annotations

import threading
from collections.abc import Callable


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
