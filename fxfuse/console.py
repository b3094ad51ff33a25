"""Terminal output for the command line and the benchmarks: aligned tables and progress bars.

Nothing here needs more than the standard library. A progress bar uses ``tqdm`` when it is
installed and falls back to a one-line counter on a terminal. When the output is piped it is
silent, or, for long runs that ask for it (``lines=True``), one plain line per step, so a log
shows where the run is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO, TypeVar

__all__ = ["format_seconds", "native_stderr_to_log", "progress", "table"]

log = logging.getLogger("fxfuse")

T = TypeVar("T")


def table(
    rows: Sequence[Sequence[str]], *, title: str | None = None, align: str | None = None
) -> str:
    """``rows`` as an aligned text table; the first row is the header (underlined).

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is
    left-aligned and every other one right-aligned (they hold numbers).
    """
    if not rows:
        return ""
    ncols = max(len(row) for row in rows)
    padded = [list(row) + [""] * (ncols - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in padded) for i in range(ncols)]
    align = (align or "l" + "r" * (ncols - 1)).ljust(ncols, "r")
    lines = [title] if title else []
    for n, row in enumerate(padded):
        cells = [
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=False)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_seconds(seconds: float | None) -> str:
    """A duration with a unit that keeps three significant digits readable (µs to minutes)."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


class _Counter:
    """A minimal progress line for when tqdm is not installed: ``desc  3/10`` on a terminal."""

    def __init__(self, iterable: Iterable[T], total: int | None, desc: str, stream: TextIO):
        self.iterable, self.total, self.desc, self.stream = iterable, total, desc, stream

    def __iter__(self) -> Iterator[T]:  # type: ignore[type-var]
        live = self.stream.isatty()
        n = 0
        for n, item in enumerate(self.iterable, 1):
            yield item
            if live:
                of = f"/{self.total}" if self.total is not None else ""
                self.stream.write(f"\r{self.desc}  {n}{of}")
                self.stream.flush()
        if live and n:
            self.stream.write("\r" + " " * (len(self.desc) + 24) + "\r")
            self.stream.flush()


def _lines(
    iterable: Iterable[T],
    total: int | None,
    desc: str,
    stream: TextIO,
    label: Callable[[T], str] | None,
) -> Iterator[T]:
    """``desc n/total: label`` as a line before each step; at most about ten lines when the
    steps are unlabelled (timing rounds)."""
    every = 1 if label is not None or not total else max(1, total // 10)
    for n, item in enumerate(iterable, 1):
        if n % every == 0 or n == 1:
            of = f"/{total}" if total is not None else ""
            text = f": {label(item)}" if label is not None else ""
            stream.write(f"{desc} {n}{of}{text}\n")
            stream.flush()
        yield item


def progress(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    enabled: bool = True,
    stream: TextIO | None = None,
    lines: bool = False,
    label: Callable[[T], str] | None = None,
) -> Iterable[T]:
    """Iterate over ``iterable`` with a progress bar on ``stream`` (default stderr).

    The bar disappears when done. When ``stream`` is not a terminal no bar is drawn; with
    ``lines`` a plain line is written per step instead (``label(item)`` says what the step
    is), so a long run whose output is piped is not silent.
    """
    stream = stream or sys.stderr
    if total is None and isinstance(iterable, Sequence):
        total = len(iterable)
    if not enabled:
        return iterable
    if lines and not stream.isatty():
        return _lines(iterable, total, desc, stream, label)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(iterable, total, desc, stream)
    disable = not stream.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, file=stream, disable=disable)


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 2 inside the block, and pass it
    to the ``fxfuse`` logger at debug level.

    ``torch.profiler`` starts Kineto, which prints ``USDT: … profiler_start`` and, without a
    GPU, ``gpuGetDeviceCount failed`` straight to the descriptor, where it would break up a
    progress bar; Python's ``sys.stderr`` cannot catch it.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace").strip()
            if text:
                log.debug("native output held back:\n%s", text)
