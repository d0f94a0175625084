"""Progress display: a tqdm bar on a terminal, a plain line every few seconds otherwise (log files, CI)."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

__all__ = ["progress", "PlainProgress"]

PLAIN_EVERY_SECONDS = 10.0


class PlainProgress:
    """tqdm's update / set_postfix / close / iteration, printing one line at most every `every` seconds.

    Lines read "desc: n/total postfix [elapsed]"; the last state is printed on close().
    """

    def __init__(self, iterable=None, total=None, desc: str = "", initial: int = 0, every: float = PLAIN_EVERY_SECONDS,
                 file=None):
        self.iterable, self.desc, self.n, self.every = iterable, desc, initial, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file = file if file is not None else sys.stderr
        self.postfix, self.t_start = "", time.time()
        self.t_printed, self.n_printed, self.closed = self.t_start, initial, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.t_printed >= self.every:
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _print(self) -> None:
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        print(f"{self.desc}: {done} {self.postfix} [{time.time() - self.t_start:.0f} s]".replace("  ", " "),
              file=self.file, flush=True)
        self.t_printed, self.n_printed = time.time(), self.n

    def close(self) -> None:
        if not self.closed and self.n != self.n_printed:
            self._print()
        self.closed = True


class _Silent:
    def __init__(self, iterable=None, initial: int = 0):
        self.iterable, self.n = iterable, initial

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable=None, *, total=None, desc: str = "", disable: bool = False, initial: int = 0, **tqdm_kwargs):
    """A progress display: tqdm when stderr is a terminal, PlainProgress when not, nothing when disabled.

    tqdm_kwargs (unit, unit_scale, ...) go to tqdm only.
    """
    if disable:
        return _Silent(iterable, initial)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, initial=initial)
