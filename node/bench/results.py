"""Scenario outcomes, the environment they were measured in, and the JSON document they form.

The document: {"schema", "profile", "started", "finished", "machine", "model", "versions",
"scenarios": [one object per scenario]}; every scenario object repeats machine, model, versions
and its own timestamp so it can be read on its own.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

SCHEMA = "node-bench/1"
STATUSES = ("ok", "skipped", "failed")


@dataclass
class Table:
    headers: list[str]
    rows: list[list] = field(default_factory=list)

    def add(self, *row) -> None:
        self.rows.append(list(row))

    def render(self) -> str:
        cells = [[_cell(v) for v in row] for row in [self.headers, *self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


@dataclass
class Outcome:
    """What a scenario hands back: JSON-able figures, a table for humans, and notes."""

    results: dict
    table: Table | None = None
    notes: list[str] = field(default_factory=list)
    status: str = "ok"


def median(values, digits: int) -> float | None:
    """The median of the values that are present (None where none is), rounded to `digits`: the
    figure a scenario reports from several rounds."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def skipped(reason: str, **results) -> Outcome:
    return Outcome(results={"skipped_reason": reason, **results}, notes=[reason], status="skipped")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the CPU makes figures noisy
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["memory_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return info


def versions() -> dict:
    from node import __version__

    found = {"node": __version__}
    for name in ("mlx", "mlx-lm", "mlx-cpu", "llama-cpp-python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def scenario_record(number: int, name: str, title: str, outcome: Outcome, env: dict, seconds: float) -> dict:
    return {
        "id": number,
        "name": name,
        "title": title,
        "status": outcome.status,
        "timestamp": timestamp(),
        "duration_s": round(seconds, 2),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # at its end
        **env,
        "results": outcome.results,
        "notes": outcome.notes,
    }


def write_document(path: Path, header: dict, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA, **header, "finished": timestamp(), "scenarios": records}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path
