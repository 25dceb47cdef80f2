"""Progress of long steps on stderr: a tqdm bar on a terminal, plain periodic lines in a log.

A bar redrawn with carriage returns turns into one unreadable line in a CI log or a file, and
no output at all leaves a user of ``internimage bench > out.txt`` guessing for minutes. So
:func:`progress` gives a tqdm bar when stderr is a terminal and otherwise a
:class:`LineProgress` that prints ``desc: n/total [elapsed]`` at most every ``interval``
seconds, and once more when the step ends.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["progress", "working", "LineProgress"]

#: Seconds between two lines of :class:`LineProgress`.
LINE_INTERVAL = 10.0


class LineProgress:
    """tqdm's interface (``update``, ``set_description``, ``set_postfix_str``, ``close``, a
    context manager) printing plain lines: at most one every ``interval`` seconds, the first
    after ``interval`` seconds, and a last one at :meth:`close` when any was printed or the
    step took longer than ``interval``."""

    def __init__(self, total: int | None, desc: str | None = None, unit: str = "it",
                 file: TextIO | None = None, interval: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc or "", unit
        self.file = file if file is not None else sys.stderr
        self.interval = LINE_INTERVAL if interval is None else interval
        self.n = 0
        self.postfix = ""
        self.started = self.last = time.perf_counter()
        self.printed = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.total is None and not self.n:  # no steps: how long it has been running
            text = f"{self.desc}: {elapsed:.0f} s"
        else:
            count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            text = f"{self.desc}: {count} {self.unit} [{elapsed:.0f} s]"
        return text + (f" {self.postfix}" if self.postfix else "")

    def _maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            print(self._line(), file=self.file, flush=True)
            self.last = now
            self.printed += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc, self.postfix = desc, ""  # a new step: the old step's details are stale
        self._maybe_print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._maybe_print()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        if self.printed or time.perf_counter() - self.started >= self.interval:
            self._maybe_print(force=True)
        self.printed = 0
        self.started = self.last = float("inf")  # closed: nothing more is printed


class _Silent(LineProgress):
    def _maybe_print(self, force: bool = False) -> None:
        pass


def progress(total: int | None, desc: str | None = None, unit: str = "it",
             enabled: bool = True, leave: bool = False, file: TextIO | None = None) -> Any:
    """A progress display on ``file`` (default stderr): a tqdm bar when it is a terminal,
    else a :class:`LineProgress`; nothing when ``enabled`` is false."""
    file = file if file is not None else sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, file)
    if file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, leave=leave,
                    dynamic_ncols=True)
    return LineProgress(total, desc, unit, file)


@contextlib.contextmanager
def working(desc: str, enabled: bool = True, file: TextIO | None = None) -> Iterator[None]:
    """Shows that one long call without steps of its own (an ONNX export, say) is running:
    the elapsed seconds, redrawn every second on a terminal, a line every
    :data:`LINE_INTERVAL` seconds in a log."""
    file = file if file is not None else sys.stderr
    if not enabled:
        yield
        return
    tty = file.isatty()
    bar = progress(None, desc, unit="s", file=file)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0 if tty else LINE_INTERVAL):
            if tty:
                bar.refresh()
            else:
                print(bar._line(), file=file, flush=True)
                bar.printed += 1

    thread = threading.Thread(target=tick, name=f"progress: {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
