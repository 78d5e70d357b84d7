"""Progress of a long job on stderr, through tqdm: a live bar on a terminal, and one line at most
every `interval` seconds when stderr is a file, so a `nohup` log keeps a readable history.

    progress = Progress(total=3000, label="train", unit="step", start=resumed_step)
    progress.update(step, {"loss": "1.2345"}, force=step == 3000)
    progress.close()
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, TextIO

from tqdm import tqdm

LOG_FORMAT = "{desc} {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
OPEN_LOG_FORMAT = "{desc} {n_fmt} [{elapsed}, {rate_fmt}]{postfix}"  # the total not known


class Progress:
    """`update(done, fields)`: `done` of `total` finished (counted from 0, `start` of them before this
    process began, e.g. a resumed run's steps; `total` None: not known); `fields` are shown after the rate."""

    def __init__(self, total: int | None, label: str = "step", unit: str = "step", start: int = 0,
                 interval: float = 2.0, stream: TextIO | None = None):
        self.total, self.label, self.unit, self.start, self.interval = total, label, unit, start, interval
        self.stream = stream or sys.stderr
        self._began = time.monotonic()
        self._last_line = -float("inf")
        is_terminal = getattr(self.stream, "isatty", lambda: False)()
        self._bar = tqdm(total=total, initial=start, desc=label, unit=unit, file=self.stream,
                         mininterval=interval, dynamic_ncols=True) if is_terminal else None

    def update(self, done: int, fields: Mapping[str, str] | None = None, force: bool = False) -> None:
        postfix = ", ".join(f"{key} {value}" for key, value in (fields or {}).items())
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(done - self._bar.n)
            if force:
                self._bar.refresh()
            return
        now = time.monotonic()
        if not force and now - self._last_line < self.interval:
            return
        self._last_line = now
        line = tqdm.format_meter(done, self.total, now - self._began, prefix=self.label, unit=self.unit,
                                 initial=self.start, postfix=postfix or None,
                                 bar_format=LOG_FORMAT if self.total is not None else OPEN_LOG_FORMAT)
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
