"""Stop signals: while training, SIGINT and SIGTERM (what clusters send before preemption) only ask the
run to stop at the next step boundary, after saving; a second SIGINT interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after saving; ``signal`` is the number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signal = signum


class StopSignals:
    """``requested``: the signal this process received (0: none), set by the handler at any moment;
    ``agreed``: the one every rank agreed to stop on after the current step, set where the ranks meet
    (under torchrun with host_sync=log: the next log step). ``announce``: say on stderr that the run will
    stop (rank 0)."""

    def __init__(self, announce: bool) -> None:
        self.requested = 0
        self.agreed = 0
        self.announce = announce

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Handlers that only note the signal, for the duration of training. Outside the main thread
        signals cannot be caught, and the defaults stay."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

        def request_stop(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.requested:
                raise KeyboardInterrupt
            self.requested = signum
            if self.announce:
                print(
                    f"\nmimkit: {signal.Signals(signum).name} received; saving at the end of this step "
                    "(Ctrl-C again to interrupt now)",
                    file=sys.stderr,
                    flush=True,
                )

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def interrupted(signum: int, step: int, epoch: int, saved: object) -> RunInterrupted:
    return RunInterrupted(
        f"stopped by {signal.Signals(signum).name} at step {step} (epoch {epoch}); saved {saved}. Run the "
        "same command again to resume (--resume auto).",
        int(signum),
    )
