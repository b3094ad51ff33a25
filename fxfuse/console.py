"""Terminal output for the command line and the benchmarks: aligned tables and progress bars.

Nothing here needs more than the standard library. A progress bar uses ``tqdm`` when it is
installed and falls back to a one-line counter on a terminal (and to silence when the output
is piped, so logs and test captures stay clean).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO, TypeVar

__all__ = ["format_seconds", "progress", "table"]

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


def progress(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Iterable[T]:
    """Iterate over ``iterable`` with a progress bar on ``stream`` (default stderr).

    The bar disappears when done and is never drawn when ``stream`` is not a terminal.
    """
    stream = stream or sys.stderr
    if total is None and isinstance(iterable, Sequence):
        total = len(iterable)
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(iterable, total, desc, stream)
    disable = not stream.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, file=stream, disable=disable)
