"""What a run prints, as it happens: lines that reach a file or pipe when they are printed, a run's own log
(OUT/run.log: the console's lines, appended on resume, each start stamped), and the progress lines' clock
(elapsed, and the remaining time at the rate so far).

    line_buffered()                      # at the face: stdout and stderr flushed at every newline
    with run_log(out, "distcl run"):     # the console's lines also go to OUT/run.log while the run lasts
        ...
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO

RUN_LOG = "run.log"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def line_buffered() -> None:
    """stdout and stderr flushed at every newline also when they are files or pipes (Python block-buffers them
    then: a redirected run's lines would arrive kilobytes late)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def time_left(elapsed_s: float, done: int, todo: int) -> str:
    """``<elapsed> elapsed, ~<left> left``: the remaining ``todo`` units at the rate of the ``done`` ones so far
    (left = elapsed / done * todo)."""
    left = f"~{duration(elapsed_s / done * todo)} left" if done > 0 else "time left unknown"
    return f"{duration(elapsed_s)} elapsed, {left}"


class _RunLogFile:
    """Complete lines, as a terminal would show them (a progress bar's carriage returns resolved, colours
    dropped), appended to ``path`` once its directory exists (a run refused before it made OUT leaves nothing)."""

    def __init__(self, path: Path, stamp: str):
        self.path, self.pending, self.partial = path, [stamp], {}
        self.file: Optional[TextIO] = None
        self.lock = threading.Lock()

    def feed(self, key: str, text: str) -> None:
        with self.lock:
            *lines, self.partial[key] = (self.partial.get(key, "") + text).split("\n")
            for line in lines:
                shown = ANSI.sub("", line).split("\r")
                shown = next((s for s in reversed(shown) if s.strip()), "")
                if shown.strip():
                    self.pending.append(shown.rstrip())
            if self.pending and (self.file is not None or self.path.parent.is_dir()):
                if self.file is None:
                    self.file = open(self.path, "a", encoding="utf-8")
                self.file.write("".join(f"{line}\n" for line in self.pending))
                self.file.flush()
                self.pending = []

    def close(self) -> None:
        for key in list(self.partial):
            self.feed(key, "\n")
        if self.file is not None:
            self.file.close()


class _Tee:
    """A text stream that writes to ``stream`` and feeds the run log; anything else is the stream's."""

    def __init__(self, stream: TextIO, key: str, sink: _RunLogFile):
        self._stream, self._key, self._sink = stream, key, sink

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._sink.feed(self._key, text)
        return n

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def run_log(out: Path, what: str) -> Iterator[None]:
    """While it lasts, what this process writes to stdout and stderr (its own lines and those Ray forwards from
    the cluster's workers) is also appended to OUT/run.log, after a line stamping this start of ``what`` (and
    before one naming the error that stopped it, if one did)."""
    stamp = f"==== {what} started {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {socket.gethostname()} (pid {os.getpid()})"
    sink = _RunLogFile(Path(out) / RUN_LOG, stamp)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(saved[0], "out", sink), _Tee(saved[1], "err", sink)
    try:
        yield
    except BaseException as err:
        sink.feed("end", f"==== {what} stopped: {type(err).__name__}: {err}\n")
        raise
    finally:
        sys.stdout, sys.stderr = saved
        sink.close()


class StepLines:
    """A training loop's ``on_step`` (distcl.training.optimise) that logs, for a row just read, at most every
    ``every_s`` seconds and at the last step: ``[distcl] <label> step s/N: loss x, <elapsed>, ~<left> left``."""

    def __init__(self, label: str, steps: int, log, every_s: float = 10.0):
        self.label, self.steps, self.log, self.every_s = label, steps, log, every_s
        self.began = self.last = time.perf_counter()
        self.first: Optional[int] = None

    def __call__(self, step: int, rows: list[dict]) -> None:
        if self.first is None:
            self.first = step
        now = time.perf_counter()
        if rows and rows[-1]["step"] == step and (now - self.last >= self.every_s or step == self.steps - 1):
            clock = time_left(now - self.began, step + 1 - self.first, self.steps - step - 1)
            self.log(f"[distcl] {self.label} step {step + 1}/{self.steps}: loss {rows[-1]['loss']:.4f}, {clock}")
            self.last = now
