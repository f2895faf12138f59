"""Progress for every wait a user sits through: a tqdm bar on a terminal, and without one (a log file, a
batch job) a plain line every ``interval`` seconds, since tqdm's bar there is one endless line of ``\\r``."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between plain lines when stderr is not a terminal


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class PlainProgress:
    """tqdm's interface (update, set_postfix, close, n, total, disable) printing ``desc: n/total unit
    (rate/s, eta)`` lines at most every ``interval`` seconds, and a last one at close."""

    disable = False

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = PLAIN_INTERVAL,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.n, self.interval = total, desc, unit, initial, interval
        self.file = file
        self.started = self.last = time.monotonic()
        self.start_n = initial
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in (values or {}).items())

    def set_postfix_str(self, text: str = "", refresh: bool = False) -> None:
        self.postfix = text

    def _print(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        eta = ""
        if self.total and rate > 0:
            eta = f", eta {tqdm.format_interval((self.total - self.n) / rate)}"
        extra = f", {self.postfix}" if self.postfix else ""
        head = f"{self.desc}: " if self.desc else ""
        line = f"{head}{done} {self.unit} ({rate:.1f} {self.unit}/s{eta}{extra})"
        print(line, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed and self.n > self.start_n and time.monotonic() - self.started >= self.interval:
            self._print()
        self.closed = True

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    enabled: bool = True,
    initial: int = 0,
    interval: float = PLAIN_INTERVAL,
) -> Any:
    """A bar on a terminal, timed plain lines elsewhere; a silent one when not ``enabled``."""
    if enabled and not is_terminal():
        return PlainProgress(total, desc, unit, initial, interval)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )
