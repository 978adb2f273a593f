"""Regenerate the screenshots of docs/cli.md and docs/serving.md: the report and the explorer.

CellBench: a model of the CEL-seq2 batches, indexed on the cell lines; the Drop-seq cells are the
query. The report is opened from disk; the explorer from a live `censusvi serve` on 127.0.0.1.
Needs Debian's chromium + chromedriver (`make browser`). Run: `.venv/bin/python docs/screenshots.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "tests")]

from censusvi.cli import main  # noqa: E402
from censusvi.client import Client  # noqa: E402
from censusvi.server import wait_healthy  # noqa: E402
from test_serve import chromium  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cellbench_lung_celllines.h5ad"


def shoot(url: str, out: Path) -> None:
    browser = chromium()
    try:
        browser.get(url)
        browser.execute_script("return window.censusviReady")
        browser.save_screenshot(str(out))
    finally:
        browser.quit()


def run() -> None:
    d = Path(tempfile.mkdtemp(prefix="censusvi-shots-"))
    a = ad.read_h5ad(DATA)
    a[a.obs["assay"] == "CEL-seq2"].copy().write_h5ad(d / "ref.h5ad")
    a[a.obs["assay"] == "Drop-seq"].copy().write_h5ad(d / "query.h5ad")
    steps = [
        ["pretrain", "--source", str(d / "ref.h5ad"), "--batch-keys", "batch", "--n-hvg", "2000",
         "--hvg-keys", "batch", "--max-epochs", "40", "--lr", "1e-3", "--quiet", "--out", str(d / "m")],
        ["index", "--model", str(d / "m"), "--data", str(d / "ref.h5ad"), "--label-keys", "cell_type",
         "--out", str(d / "ix"), "--quiet"],
        ["annotate", "--model", str(d / "m"), "--index", str(d / "ix"), "--query", str(d / "query.h5ad"),
         "--batch-key", "batch", "--out", str(d / "annotated.h5ad"), "--quiet"],
        ["report", "--mapped", str(d / "annotated.h5ad"), "--reference", str(d / "ix"),
         "--out", str(d / "report.html"), "--quiet"],
    ]  # fmt: skip
    for argv in steps:
        assert main(argv) == 0, argv
    shoot((d / "report.html").as_uri(), ROOT / "docs" / "report.png")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    assert main(["models", "register", str(d / "m"), "--index", str(d / "ix")]) == 0
    assert main(["models", "promote", "censusvi-scvi", "1"]) == 0
    serve = subprocess.Popen(
        [sys.executable, "-m", "censusvi.cli", "serve", "--model", "models:/censusvi-scvi@production",
         "--port", "8411", "--quiet"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "platform")},
    )  # fmt: skip
    try:
        url = "http://127.0.0.1:8411"
        wait_healthy(url, 300)
        out = Client(url).annotate(ad.read_h5ad(d / "query.h5ad"), batch_key="batch")
        shoot(url + out.uns["censusvi"]["explorer"][0], ROOT / "docs" / "explorer.png")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)


if __name__ == "__main__":
    run()
