"""Console output and progress, on stderr so that stdout stays for results.

On a terminal a stage shows one live rich bar; off a terminal (CI, `make demo > log`, a cluster job) the
same fields come as one plain line every few seconds (`SLMFORGE_PROGRESS_SECONDS`, default 5) and a
last line when the work ends, with no carriage returns or cursor moves, and tables are as wide as they
need (up to `COLUMNS`, default 200) instead of being cut at 80 columns. While a stage builds, what other
libraries print (tqdm bars, transformers' and datasets' warnings, trl's log dicts, datatrove's workers)
goes to `<workdir>/logs/<stage>.log` instead (`stage_output`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn


def _console(stderr: bool = True) -> Console:
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else int(os.environ.get("COLUMNS") or 200)
    return Console(stderr=stderr, highlight=False, width=width, soft_wrap=not probe.is_terminal)


console = _console()
results = _console(stderr=False)  # a stage's result tables, on stdout (evaluate's)


def info(msg: str) -> None:
    console.print(msg)


def interval() -> float:
    """Seconds between two plain progress lines off a terminal."""
    try:
        return max(0.0, float(os.environ.get("SLMFORGE_PROGRESS_SECONDS", "5")))
    except ValueError:
        return 5.0


def heartbeat() -> float:
    """The longest a bar stays silent (`SLMFORGE_HEARTBEAT_SECONDS`, default 30): a step or item that takes
    longer still gets a line with the time elapsed, so a slow run never looks hung."""
    try:
        return max(1.0, float(os.environ.get("SLMFORGE_HEARTBEAT_SECONDS", "30")))
    except ValueError:
        return 30.0


def clock(seconds: float) -> str:
    """1:05, 1:02:03."""
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _amount(n: float, unit: str) -> str:
    if unit == "bytes":
        return f"{n / 1e6:,.1f} MB"
    return f"{n:,.0f}" if isinstance(n, float) and n != int(n) else f"{int(n):,}"


class Bar:
    """One stage's progress: `update(completed=, advance=, **fields)`; the line shows the description,
    done/total and percent, the rate (per second of this bar's life, or `rate=(value, unit)` given by the
    caller, e.g. training tokens/s measured the way the stage's summary measures them), elapsed time, ETA,
    then `fields` in order (loss, items, ...). Rendered as a rich bar on a terminal, else as plain lines;
    a thread renders it again whenever it has been silent for heartbeat() seconds."""

    def __init__(self, description: str, total: float | None, unit: str = "", completed: float = 0):
        self.description, self.total, self.unit = description, total, unit
        self.completed = self._start = completed
        self.fields: dict[str, str] = {}
        self.rate: tuple[float, str] | None = None
        self._t0 = self._t_done = time.time()  # _t_done: when `completed` last moved
        self._last_line = 0.0
        self._live: Progress | None = None
        self._task = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _emit(self) -> None:
        with self._lock:
            self._last_line = time.time()
            if self._live is not None:
                self._live.update(self._task, completed=self.completed, line=self.line())
            else:
                self._print()

    def _print(self) -> None:
        text = f"{self.description} · {self.line()}"
        if text != getattr(self, "_printed", None):  # the closing line, when the last update said it already
            console.print(text, markup=False)
            self._printed = text

    def _beat(self) -> None:
        quiet = heartbeat()
        while not self._stop.wait(1.0):
            if time.time() - self._last_line >= quiet:
                self._emit()

    def __enter__(self) -> Bar:
        if console.is_terminal:
            self._live = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[line]}"),
                                  console=console, transient=False)
            self._live.start()
            self._task = self._live.add_task(self.description, total=self.total, completed=self.completed,
                                              line=self.line())
        self._last_line = time.time()
        threading.Thread(target=self._beat, daemon=True, name=f"progress: {self.description}").start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.update(self._task, completed=self.completed, line=self.line())
            self._live.stop()
        else:
            with self._lock:
                self._print()

    def update(self, completed: float | None = None, advance: float = 0, rate: tuple[float, str] | None = None,
               **fields) -> None:
        before = self.completed
        self.completed = (self.completed if completed is None else completed) + advance
        if self.completed != before:
            self._t_done = time.time()
        if rate is not None:
            self.rate = rate
        self.fields.update({k: str(v) for k, v in fields.items()})
        if self._live is not None or time.time() - self._last_line >= interval():
            self._emit()

    def line(self) -> str:
        # the rate and ETA count the time up to the last completed item, so that a heartbeat in the
        # middle of a slow item neither inflates the rate nor pushes the ETA out; the ETA then subtracts
        # the time already spent on the current item
        now = time.time()
        elapsed, working = now - self._t0, self._t_done - self._t0
        done = self.completed - self._start
        parts = []
        if self.total:
            parts.append(f"{_amount(self.completed, self.unit)}/{_amount(self.total, self.unit)}"
                         f"{' ' + self.unit if self.unit and self.unit != 'bytes' else ''} "
                         f"({min(self.completed / self.total, 1):.0%})")
        else:
            parts.append(f"{_amount(self.completed, self.unit)} {self.unit}".strip())
        if self.rate is not None:
            parts.append(f"{self.rate[0]:,.0f} {self.rate[1]}")
        elif working > 0 and done > 0:
            r = done / working
            unit = self.unit or "items"
            parts.append(f"{r / 1e6:,.2f} MB/s" if self.unit == "bytes" else
                         f"{1 / r:,.1f} s/{unit.removesuffix('s')}" if r < 1 else  # slow items: time per item
                         f"{r:,.{1 if r < 10 else 0}f} {unit}/s")
        eta = max(0.0, (self.total - self.completed) * working / done - (now - self._t_done)) \
            if self.total and done > 0 and working > 0 else None
        parts.append(f"{clock(elapsed)} elapsed" + (f", ETA {clock(eta)}" if eta is not None else ""))
        parts += [v for v in self.fields.values() if v]
        return " · ".join(parts)


def progress(description: str, total: float | None, unit: str = "", completed: float = 0) -> Bar:
    """`with progress("synth · extractive", 400, "chunks") as bar: ... bar.update(advance=1)`."""
    return Bar(description, total, unit, completed)


@contextlib.contextmanager
def stage_output(log: Path):
    """Within: file descriptors 1 and 2 (and so sys.stdout/stderr, the Python `logging` handlers that
    write there, tqdm, warnings, and the processes a stage forks) go to `log`, appended; slmforge's own
    console keeps writing to the real stderr. transformers' and datasets' bars are switched off.
    Nested use (a stage that runs inside another's build) keeps the outer redirection."""
    if getattr(stage_output, "active", False):
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    # our consoles go where stdout/stderr went: a copy of fd 1/2, or the stream that stands in for it
    # (pytest's capsys, a notebook), which the redirection does not touch
    real_out, own_out = _real(sys.stdout, saved[1])
    real_err, own_err = _real(sys.stderr, saved[2])
    old = sys.stdout, sys.stderr, console._file, results._file  # rich's: None means sys.stderr/out, looked up per write
    quiet = _quiet_bars()
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} ====\n")
            f.flush()
            for fd in (1, 2):
                os.dup2(f.fileno(), fd)
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", errors="replace",
                                      line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), encoding="utf-8", errors="replace",
                                      line_buffering=True)
        _repoint_log_handlers(old[0], old[1], sys.stdout, sys.stderr)
        console.file, results.file = real_err, real_out
        stage_output.active = True
        yield
    finally:
        stage_output.active = False
        mine = sys.stdout, sys.stderr
        for stream in mine:
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        sys.stdout, sys.stderr, console._file, results._file = old
        _repoint_log_handlers(mine[0], mine[1], old[0], old[1])
        for stream in mine:
            with contextlib.suppress(Exception):
                stream.close()
        for stream, own in ((real_out, own_out), (real_err, own_err)):
            stream.flush()
            if own:
                stream.close()
        quiet()


def _real(stream, saved_fd: int):
    """(the stream our console should write to while fds 1/2 point at the log, whether we opened it)."""
    try:
        on_fd = stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):
        on_fd = False
    if not on_fd:
        return stream, False
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace"), True


def _repoint_log_handlers(out_from, err_from, out_to, err_to) -> None:
    """logging.StreamHandlers made before the redirection hold the old sys.stderr object, whose file
    descriptor is the real stderr: point them at the new one (and back)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is not logging.StreamHandler:
                continue  # FileHandlers, logging.lastResort (it looks sys.stderr up itself), ...
            with contextlib.suppress(Exception):
                if h.stream is err_from:
                    h.setStream(err_to)
                elif h.stream is out_from:
                    h.setStream(out_to)


def _quiet_bars():
    """Switch off transformers' and datasets' own progress bars; returns the undo."""
    undo = []
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        with contextlib.suppress(Exception):
            import datasets

            if datasets.is_progress_bar_enabled():
                datasets.disable_progress_bars()
                undo.append(datasets.enable_progress_bars)

    def restore():
        for f in undo:
            f()
    return restore
