"""Progress of long work, readable on a terminal and in a log.

``Progress`` counts units of work (blocks, windows, training steps) and carries a few numbers beside
the count (the loss, say). On a terminal it is a tqdm bar; anywhere else (a log file, CI, a pipe) it
writes one plain line when it starts, then one every ``interval`` seconds, then one when it ends, so a
log shows what is running and how far it got without carriage-return noise. Disabled, it is silent.
"""

from __future__ import annotations

import sys
import time


def _format_numbers(numbers: dict) -> str:
    return ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in numbers.items()
    )


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    def __init__(
        self,
        total: int | None,
        description: str,
        unit: str = "it",
        enabled: bool = True,
        interval: float = 30.0,
        stream=None,
    ):
        self.total, self.description, self.unit = total, description, unit
        self.enabled, self.interval = enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.count, self.numbers = 0, {}
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if not enabled:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit=unit, file=self.stream, dynamic_ncols=True)
        else:
            self._line("started")

    def update(self, count: int = 1, **numbers) -> None:
        """``count`` more units done; ``numbers`` (loss=..., ...) replace the ones shown."""
        self.count += count
        self.numbers.update(numbers)
        if self.bar is not None:
            if numbers:
                self.bar.set_postfix_str(_format_numbers(self.numbers), refresh=False)
            self.bar.update(count)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.last_line is not None:
            self._line("done")
        self.enabled = False

    def _line(self, state: str | None = None) -> None:
        elapsed = time.monotonic() - self.started
        parts = [f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"]
        if state != "started":
            parts.append(_format_seconds(elapsed))
        if state is None and self.total and self.count:
            parts.append(f"{_format_seconds(elapsed / self.count * (self.total - self.count))} left")
        if self.numbers:
            parts.append(_format_numbers(self.numbers))
        prefix = f"{self.description}: {state}, " if state else f"{self.description}: "
        print(prefix + ", ".join(parts), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, description: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """Iterate over ``iterable`` with a ``Progress`` counting one unit per item."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, description, unit, enabled) as progress:
        for item in iterable:
            yield item
            progress.update()
