"""bench/census_scale.py at a tiny N: it builds, plans, runs the HVG tasks and two Train workers,
and ends with its contract line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "census_scale.py"
LAST = re.compile(
    r"census scale (\d+) cells: driver peak (\d+\.\d\d) GiB, worker peak (\d+\.\d\d) GiB, "
    r"hvg task peak (\d+\.\d\d) GiB, plan (\d+\.\d) s"
)


def test_census_scale_smoke_prints_its_contract_line():
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--cells",
            "4000",
            "--steps",
            "3",
            "--object-store-gib",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    n, driver, worker, hvg, plan = m.groups()
    assert n == "4000" and float(plan) > 0
    # every kind of process was seen (sampled while it ran) and none is implausibly large
    assert 0.05 < float(driver) < 8 and 0.05 < float(worker) < 8 and 0.05 < float(hvg) < 8
    assert any(line.startswith("worker 1: ") for line in lines)  # both workers trained
