"""Helpers shared by the benchmark scripts: a mock-serve subprocess, timing, machine info."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}"
    )


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from txagg.testing import MockProcess as MockServer  # noqa: E402, F401 (the bench scripts' name)
from txagg.testing import txagg_command as txagg  # noqa: E402


def timed_sync(url: str, db: Path, *options: str) -> tuple[dict, float]:
    """`txagg sync --json` in a subprocess, start-up included: its summary and wall seconds."""
    began = time.perf_counter()
    out = subprocess.run(
        txagg("sync", "--api-url", url, "--db", str(db), "--settle", "0", "--json", *options),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out), time.perf_counter() - began


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1000:.1f} ms, "
        f"p90 {percentile(values, 0.9) * 1000:.1f} ms, "
        f"min {min(values) * 1000:.1f} ms (n={len(values)})"
    )
