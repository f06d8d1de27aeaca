"""SIGINT and SIGTERM ask the training loop to stop: it finishes the current step (and its
evaluation), saves a checkpoint and returns; a second SIGINT raises ``KeyboardInterrupt`` at once.
Under data parallelism the processes agree on the stop (:func:`samlm.integrations.distributed.agree_on_stop`)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a 2nd SIGINT stops at once);
    ``received`` is the name of the first one. A context manager that restores the previous handlers.

    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # Only set a flag: printing or saving from inside a signal handler can deadlock.
        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.received = name

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
