"""Per-iteration and per-recovery metrics as JSON lines (one file per rank)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class MetricsWriter:
    """Appends JSON records to ``path_template`` with ``{rank}`` filled in (no-op if empty)."""

    def __init__(self, path_template: str, rank: int):
        self.path = Path(path_template.replace("{rank}", str(rank))) if path_template else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a") if self.path is not None else None  # noqa: SIM115
        self._lock = threading.Lock()  # the failure detector writes from its own thread

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_metrics(directory: str | os.PathLike) -> dict[int, list[dict]]:
    """All ranks' records from a directory of ``rank{R}.jsonl`` files."""
    out: dict[int, list[dict]] = {}
    for path in sorted(Path(directory).glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
