"""Tables and the contract line of bench/annotation.py, from its per-run rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "onto_accuracy": "onto-acc",
           "novel_auroc": "novel AUROC"}  # fmt: skip


def is_baseline(method: str) -> bool:
    return not method.startswith("censusvi")


def by_method(rows: pd.DataFrame) -> pd.DataFrame:
    """Each method's metrics: the mean over seeds per split, then the mean over splits."""
    per_split = rows.groupby(["split", "method"]).mean(numeric_only=True)
    return per_split.groupby("method").mean()


def versus_best_baseline(rows: pd.DataFrame, default: str) -> tuple[float, float, str]:
    """(D, A, best baseline): the default method's mean macro-F1 minus the best baseline's
    (the baseline with the highest mean macro-F1), and its mean novel-type AUROC."""
    means = by_method(rows)
    baselines = [m for m in means.index if is_baseline(m)]
    best = str(means.loc[baselines, "macro_f1"].idxmax())
    d = means.loc[default, "macro_f1"] - means.loc[best, "macro_f1"]
    return float(d), float(means.loc[default, "novel_auroc"]), best


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    sd = f" ± {values.std(ddof=0):.3f}" if len(values) > 1 else ""
    return f"{values.mean():.3f}{sd}"


def family_table(rows: pd.DataFrame) -> list[str]:
    """Markdown rows: per split and method the mean ± sd over seeds, then the family mean."""
    head = "| split | method | seeds | " + " | ".join(METRICS.values()) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(METRICS)]
    for (split, method), g in rows.groupby(["split", "method"], sort=False):
        cells = " | ".join(_cell(g[k]) for k in METRICS)
        lines.append(f"| {split} | {method} | {len(g)} | {cells} |")
    for method, m in by_method(rows).iterrows():
        cells = " | ".join("–" if np.isnan(m[k]) else f"**{m[k]:.3f}**" for k in METRICS)
        lines.append(f"| family mean | {method} | | {cells} |")
    return lines


def report(rows: pd.DataFrame, default: str, seconds: float) -> None:
    """Print a table per split family, D and A per family, the run time, then the contract."""
    rows = rows.sort_values(["family", "split", "method", "seed"], kind="stable")
    for family, g in rows.groupby("family", sort=False):
        print(f"\n### {family}  (mean ± sd over seeds)")
        print("\n".join(family_table(g)))
        d, a, best = versus_best_baseline(g, default)
        print(f"{family}: {default} vs best baseline ({best}): macro-F1 {d:+.3f}, "
              f"novel-type AUROC {a:.3f}")  # fmt: skip
    print(f"\nrun time: {seconds / 60:.1f} min")
    d, a, best = versus_best_baseline(rows, default)
    print(f"(every split: best baseline {best}; default method {default})")
    print(f"annotation vs best baseline: macro-F1 {d:+.3f}, novel-type AUROC {a:.3f}")
