"""Where metrics go: a :class:`Logger` fans each record out to its destinations.

Destinations: :class:`InMemoryLogger` (a list, for tests and notebooks) and
:class:`JSONLinesLogger` (one JSON object per line in a file). Pass them to the trainer as
``Trainer(..., loggers=[JSONLinesLogger("runs/x/metrics.jsonl")])``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emakit.time import Timestamp

__all__ = ["InMemoryLogger", "JSONLinesLogger", "Logger", "LoggerDestination"]


class LoggerDestination:
    """Receives every metrics record; override :meth:`log_metrics`."""

    def log_metrics(self, metrics: dict[str, float], timestamp: Timestamp) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the destination holds."""


class InMemoryLogger(LoggerDestination):
    """Keeps every record as ``{"batch": ..., "epoch": ..., **metrics}`` in :attr:`records`."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], timestamp: Timestamp) -> None:
        self.records.append({"batch": timestamp.batch, "epoch": timestamp.epoch, **metrics})


class JSONLinesLogger(LoggerDestination):
    """Appends one JSON object per record to ``path`` (its folder is created)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], timestamp: Timestamp) -> None:
        record = {"batch": timestamp.batch, "epoch": timestamp.epoch, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Logger:
    """What algorithms and callbacks log through: ``logger.log_metrics({"loss": 0.3})``."""

    def __init__(self, destinations: Sequence[LoggerDestination], timestamp: Timestamp) -> None:
        for destination in destinations:
            if not isinstance(destination, LoggerDestination):
                raise ValueError(f"loggers must be emakit.loggers.LoggerDestination instances, got {destination!r}")
        self.destinations = list(destinations)
        self._timestamp = timestamp

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for destination in self.destinations:
            destination.log_metrics(metrics, self._timestamp)

    def close(self) -> None:
        for destination in self.destinations:
            destination.close()
