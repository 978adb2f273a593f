"""Static PNGs of a report's content, for papers (matplotlib, no display needed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def _legend_text(label: str) -> str:
    """A label as the legend shows it: matplotlib leaves out of the legend any label that starts
    with '_' (its mark for helper artists); a leading space keeps it in."""
    return f" {label}" if str(label).startswith("_") else str(label)


def _scatter(ax, content: dict, values: list, title: str, continuous: bool = False) -> None:
    r, q = content["reference"], content["query"]
    ax.scatter(r["x"], r["y"], s=3, c="#d0d0d0", linewidths=0)
    if continuous:
        sc = ax.scatter(
            q["x"], q["y"], s=5, c=values, cmap="coolwarm", vmin=0, vmax=1, linewidths=0
        )
        ax.figure.colorbar(sc, ax=ax, shrink=0.7)
    else:
        cats = sorted(set(values))
        cmap = __import__("matplotlib").colormaps["tab20"]
        for k, cat in enumerate(cats):
            sel = np.array(values) == cat
            ax.scatter(np.array(q["x"])[sel], np.array(q["y"])[sel], s=5, color=cmap(k % 20),
                       label=_legend_text(cat), linewidths=0)  # fmt: skip
        ax.legend(
            markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def write_pngs(content: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The PNGs, drawn into a scratch folder first and moved into ``out_dir`` only when all are
    drawn: a figure that fails leaves no half set behind. Text is drawn as given: '$' in a label
    or batch is not read as matplotlib's math notation (a '$\\frac{$' batch stopped the drawing)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="censusvi-png-") as tmp:
        with matplotlib.rc_context({"text.parse_math": False}):
            names = _draw(content, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.move(Path(tmp) / name, out / name)
    return [out / name for name in names]


def _draw(content: dict[str, Any], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    q, key = content["query"], content["label_key"]
    written = []
    for name, values, title, continuous in (
        ("umap_predicted", q["predicted"], f"predicted {key}", False),
        ("umap_uncertainty", q["uncertainty"], f"{key} uncertainty", True),
        ("umap_batch", q["batch"], "batch", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 5))
        _scatter(ax, content, values, title, continuous)
        fig.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(f"{name}.png")
    e = content.get("evaluation")
    if e:
        conf = e["confusion"]
        fig, ax = plt.subplots(
            figsize=(1 + 0.5 * len(conf["predicted"]), 1 + 0.5 * len(conf["true"]))
        )
        m = np.array(conf["counts"], dtype=float)
        ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(conf["predicted"])), conf["predicted"], rotation=90)
        ax.set_yticks(range(len(conf["true"])), conf["true"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"accuracy {e['accuracy']:.3f}, macro-F1 {e['macro_f1']:.3f}")
        fig.savefig(out / "confusion.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(4, 4))
        cal = e["calibration"]
        ax.plot([0, 1], [0, 1], color="#aaa")
        ax.plot([b["confidence"] for b in cal], [b["accuracy"] for b in cal], "o-", color="#d62728")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"calibration (ECE {e['ece']:.3f})")
        fig.savefig(out / "calibration.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        written += ["confusion.png", "calibration.png"]
    return written
