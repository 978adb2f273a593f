"""Smoke test of bench/annotation.py: one small split, censusvi and PCA + kNN, the contract line."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "annotation.py"
CONTRACT = re.compile(
    r"^annotation vs best baseline: macro-F1 ([+-]\d\.\d{3}), novel-type AUROC (\d\.\d{3})$"
)


def test_annotation_bench_quick(shared_data, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("annotation_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "annotation_bench", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    argv = ["--quick", "--max-cells", "100", "--families", "pbmc-cross", "--scvi-seeds", ""]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "every hand-set term id and name checked" in "\n".join(lines)
    d, a = map(float, CONTRACT.match(lines[-1]).groups())
    assert -1.0 <= d <= 1.0 and not math.isnan(d)
    assert 0.0 <= a <= 1.0
    assert any(line.startswith("| family mean | PCA + kNN |") for line in lines)
