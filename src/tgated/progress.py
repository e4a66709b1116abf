"""Progress reporting: a bar on a terminal, plain log lines everywhere else.

A tqdm bar redraws itself with carriage returns; in a file, a pipe or a CI log that leaves thousands
of partial lines. :func:`progress` therefore shows a bar only when standard error is a terminal.
Elsewhere an outer loop (one item per case, per epoch) logs one line per item at INFO level, and an
inner loop (slices, batches: ``lines=False``) stays silent. ``quiet`` turns both off.

This module imports nothing of ours; tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


def on_terminal() -> bool:
    """True when standard error (where bars are drawn) is an interactive terminal."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced by an object without isatty
        return False


class _Lines:
    """The tqdm subset the package uses (iteration, ``update``, ``set_postfix``, ``close``), writing
    one log line per finished item instead of a bar (nothing when ``lines`` is False)."""

    def __init__(
        self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str, initial: int, lines: bool
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.lines = lines
        self.postfix = ""

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.lines:
            of = f"/{self.total}" if self.total is not None else ""
            logger.info("%s: %d%s %s%s", self.desc, self.n, of, self.unit, self.postfix)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")" if values else ""

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    quiet: bool = False,
    lines: bool = True,
    leave: bool = True,
    initial: int = 0,
) -> Any:
    """A progress bar over ``iterable`` (or one updated by hand, with ``total``).

    On a terminal: a tqdm bar (``leave``: keep it when done). Elsewhere: one INFO log line per item
    (``desc: n/total unit``) when ``lines``, else nothing. ``quiet``: neither.
    """
    if quiet or not on_terminal():
        return _Lines(iterable, total, desc, unit, initial, lines and not quiet)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial)
