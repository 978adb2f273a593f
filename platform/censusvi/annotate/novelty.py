"""Out-of-reference detection: how likely a query cell is of a kind the reference holds.

Signals, each larger for a cell less like the reference:

- ``distance``: the mean distance to its k nearest reference cells (the index's search);
- ``nll``: its reconstruction -log p(x | z) per count under the reference model (the mapping's
  ``censusvi_nll_per_count``); a cell whose expression the model cannot explain;
- ``entropy``: the entropy of the label head's p(label | cell) (temperature-scaled, before class
  balance): a cell the head cannot place among the reference's types.

Fitted on held-out reference cells at index build, no query labels (``fit``): each signal's
quantiles at ``LEVELS`` (0, 0.01, ..., 0.99) give an upper-tail p-value per cell (``tail_p``):
empirical up to the 99th percentile, an exponential tail beyond it,
``0.01 * exp(-(s - q99) / (q99 - q50))``. The p-values of the signals a caller has are combined
into one statistic (``STATISTIC``), whose own reference distribution is fitted the same way (the
signals are correlated, so no textbook null holds; its tail falls by e per unit of -log p); its
p-value gives the in-reference
probability ``min(1, p / ALPHA)``: 1 for 99 % of reference-like cells (so the head's calibration
on reference cells stands), decaying in the tail. Label probabilities are multiplied by it; the
missing mass is the chance that the cell is of a type the reference lacks, and shows in
``KEY_uncertainty``. With the distance alone and the two quantiles an index without this fit has
(``neighbour_distance``: q50, q99), the probability equals ``transfer.typicality``.

Chosen by measurement (bench/annotation.py --novelty-study, seed 0, 2026-12-03; bench/RESULTS.md):
Fisher's sum over all three signals, ALPHA = 0.01. Novel-type AUROC of the uncertainty, mean over
the bench's 6 splits (type left out of the index; the model has seen it, so the NLL cannot tell:
alone 0.47): knn 0.772 / head 0.807 / ensemble 0.817, against 0.717 / 0.814 / 0.815 for the
distance typicality it replaces. Where the model never saw the type (3-chemistry PBMC without B
cells -> sorted Zheng PBMC; NLL alone 0.685, distance alone 0.986): 0.905 / 0.954 / 0.952,
against 0.837 / 0.942 / 0.925 for the distance alone (distance + NLL: 0.872 / 0.942 / 0.930);
the largest -log p ("max") instead of the sum 0.839 / 0.939 / 0.923. Distance + entropy ranks
as well or a little better (bench 0.773 / 0.816 / 0.823; unseen B 0.912 / 0.960 / 0.959): the
NLL is kept for the calibration of reference-like cells (the head's held-out ECE below: 0.027
with it, 0.041 without) and for types the model has not learnt, where it adds to the distance.
ALPHA 0.05 ranks better (bench 0.794 / 0.817 / 0.820; unseen B 0.959 / 0.967 / 0.968) but costs
calibration: the head's
ECE on held-out reference cells (no class balance) 0.035 against 0.027 at 0.01 and 0.033 with the
typicality (30 % of each bench reference); on the tests' PBMC model, 0.070 / 0.034 / 0.162 on three
random halves against 0.049 / 0.028 / 0.107 at 0.01.

Measured again over three seeds (session 17, bench/RESULTS.md), the NLL is left out of the
combination (``COMBINED``); it is still fitted and stored, and written per cell. A query of
another study has its whole NLL distribution shifted, so its tail test lowered the in-reference
probability of the known types' cells too: without it the query's ECE on its known types falls
from 0.094 to 0.060 (full index 0.085 -> 0.061), at the same ranking (A 0.830 vs 0.832) and
held-out reference ECE (0.037 vs 0.038); where the model never saw the type (the unseen-B split
above, 60-epoch models, seeds 0 / 1) every method ranks better without it (ensemble 0.905 vs
0.892, 0.990 vs 0.984).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from censusvi.numeric import is_finite

VERSION = 1
SIGNALS = ("distance", "nll", "entropy")  # distance comes from every search; the others may not
COMBINED = ("distance", "entropy")  # what the in-reference probability reads (module docstring)
LEVELS = np.round(np.arange(100) / 100, 2)  # quantile levels stored: 0, 0.01, ..., 0.99
ALPHA = 0.01  # reference cells beyond this tail share get an in-reference probability below 1
STATISTICS = ("fisher", "max")  # sum of -log p (Fisher's), or the largest (min-p)
STATISTIC = "fisher"  # measured choice (module docstring; bench/RESULTS.md)
P_FLOOR = 1e-300


def tail_table(values: np.ndarray, scale: float | None = None) -> dict:
    """A signal's reference distribution: its quantiles at ``LEVELS`` (plain numbers), and the
    scale of its exponential tail where it is known (else q99 - q50)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise ValueError("no finite reference values to fit a signal's distribution on")
    out = {"q": [float(v) for v in np.quantile(values, LEVELS)]}
    return out if scale is None else {**out, "scale": scale}


def tail_p(values: np.ndarray, table: dict) -> np.ndarray:
    """P(reference signal >= value) per cell: interpolated between the stored quantiles, an
    exponential tail beyond the top one (``q`` at ``LEVELS``, or a legacy ``q50``/``q99`` pair,
    whose p-value is 1 up to q99)."""
    values = np.asarray(values, dtype=float)
    if "q" in table:
        q = np.asarray(table["q"], dtype=float)
        q50, q_top, top = q[50], q[-1], LEVELS[-1]
        body = 1.0 - np.interp(values, q, LEVELS)
    else:
        q50, q_top, top = table["q50"], table["q99"], 0.99
        body = np.ones_like(values)
    spread = max(table.get("scale", q_top - q50), 1e-6)
    tail = (1.0 - top) * np.exp(-np.maximum(values - q_top, 0.0) / spread)
    return np.clip(np.where(values > q_top, tail, body), P_FLOOR, 1.0)


def statistic(pvalues: list[np.ndarray], kind: str = STATISTIC) -> np.ndarray:
    """Per cell, one number from its signals' p-values: larger = less like the reference."""
    if kind not in STATISTICS:
        raise ValueError(f"statistic {kind!r}: choose one of {', '.join(STATISTICS)}")
    logs = -np.log(np.stack(pvalues))
    return logs.sum(0) if kind == "fisher" else logs.max(0)


def subset_name(names) -> str:
    return "+".join(s for s in SIGNALS if s in set(names))


def fit(signals: dict[str, np.ndarray], kind: str = STATISTIC, alpha: float = ALPHA) -> dict:
    """The fit stored in index.json from held-out reference cells' signals (one array each, the
    same cells): each signal's table, and the combined statistic's table for every subset of
    them that holds the distance (a caller without the NLL still gets a fitted combination)."""
    if "distance" not in signals:
        raise ValueError("the distance signal is needed: every query has neighbour distances")
    tables = {name: tail_table(v) for name, v in signals.items()}
    others = [s for s in SIGNALS if s in signals and s != "distance"]
    combined = {}
    for r in range(1, len(others) + 1):  # the distance alone needs no combining
        for extra in combinations(others, r):
            names = ("distance", *extra)
            p = [tail_p(signals[s], tables[s]) for s in names]
            # in -log p units a combined tail falls by e per unit (Fisher's sum of k: a gamma(k)
            # tail ~ t^(k-1) e^-t; the largest of k: ~ k e^-t): scale 1, not its body's spread
            combined[subset_name(names)] = tail_table(statistic(p, kind), scale=1.0)
    return {"signals": tables, "combined": combined, "statistic": kind, "alpha": alpha}


def in_reference(
    signals: dict[str, np.ndarray | None], fitted: dict, alpha: float | None = None
) -> np.ndarray:
    """The probability that each cell is of a kind the reference holds, from the signals the
    caller has (None or non-finite values: that signal is left out for the cell's call) and a
    ``fit``, ``min(1, p / alpha)`` (default: the fit's alpha). Only signals the fit holds are
    used."""
    alpha = alpha if alpha is not None else fitted.get("alpha", ALPHA)
    have = {
        s: np.asarray(v, dtype=float)
        for s, v in signals.items()
        if v is not None and s in fitted["signals"]
    }
    if "distance" not in have:
        raise ValueError("in_reference needs the cells' neighbour distances")
    n = len(have["distance"])
    out = np.ones(n)
    usable = {s: np.isfinite(v) for s, v in have.items()}
    # cells differ only in which optional signals are finite: one pass per pattern seen
    patterns = np.stack([usable[s] for s in have], axis=1)
    for pattern in np.unique(patterns, axis=0):
        rows = (patterns == pattern).all(1)
        names = [s for s, use in zip(have, pattern) if use]
        if "distance" not in names:
            continue  # no distance: nothing to say (kept at 1)
        p = [tail_p(have[s][rows], fitted["signals"][s]) for s in names]
        if len(p) == 1:
            out[rows] = p[0]
        else:
            t = statistic(p, fitted.get("statistic", STATISTIC))
            out[rows] = tail_p(t, fitted["combined"][subset_name(names)])
    return np.minimum(out / alpha, 1.0)


def entropy(prob: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``prob``."""
    p = np.clip(np.asarray(prob, dtype=float), 1e-12, 1.0)
    return -(p * np.log(p)).sum(1)


def legacy_fit(neighbour_distance: dict | None) -> dict | None:
    """An index without a fit: its neighbour-distance q50/q99 as a distance-only fit whose
    in-reference probability equals ``transfer.typicality`` (None: no distances either)."""
    if not neighbour_distance:
        return None
    table = {"q50": neighbour_distance["q50"], "q99": neighbour_distance["q99"]}
    return {"signals": {"distance": table}, "combined": {}, "alpha": 0.01}


def check_stored(stored: dict) -> None:
    """A ValueError naming what is wrong with index.json's ``novelty`` entry (``fit``'s tables
    under ``version`` and ``keys``), so an edited one fails at load, not mid-annotation."""
    if not isinstance(stored, dict) or not isinstance(stored.get("keys", {}), dict):
        raise ValueError("novelty is not an object with per-key fits")
    if stored.get("version", 0) != VERSION:
        return  # another version's fit is not read (pipeline.in_reference_probability)
    for key, fitted in stored.get("keys", {}).items():
        try:
            check_fit(fitted)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"novelty fit of {key!r}: {e}") from None


def check_fit(fitted: dict) -> None:
    """A ValueError where ``fitted`` is not what ``fit`` (or ``legacy_fit``) returns."""
    if not isinstance(fitted, dict) or not isinstance(fitted.get("signals"), dict):
        raise ValueError("not an object with signal tables")
    if "distance" not in fitted["signals"]:
        raise ValueError("no distance table")
    unknown = set(fitted["signals"]) - set(SIGNALS)
    if unknown:
        raise ValueError(f"unknown signal(s) {sorted(unknown)}; known: {list(SIGNALS)}")
    alpha = fitted.get("alpha", ALPHA)
    if not is_finite(alpha) or not 0 < alpha <= 1:
        raise ValueError(f"alpha {alpha!r} is not in (0, 1]")
    if not isinstance(fitted.get("combined", {}), dict):
        raise ValueError("combined is not an object of tables")
    if fitted.get("statistic", STATISTIC) not in STATISTICS:
        raise ValueError(f"statistic {fitted.get('statistic')!r} is not one of {list(STATISTICS)}")
    tables = {
        **fitted["signals"],
        **{f"combined {n}": t for n, t in fitted.get("combined", {}).items()},
    }
    for name, table in tables.items():
        _check_table(name, table)
    others = [s for s in SIGNALS if s in fitted["signals"] and s != "distance"]
    for r in range(1, len(others) + 1):
        for extra in combinations(others, r):
            if subset_name(("distance", *extra)) not in fitted.get("combined", {}):
                raise ValueError(f"no combined table for {subset_name(('distance', *extra))}")


def _check_table(name: str, table) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{name} table is not an object")
    if "q" in table:
        q = np.asarray(table["q"], dtype=float)
        ok = q.shape == LEVELS.shape and np.isfinite(q).all() and (np.diff(q) >= 0).all()
    else:
        q = np.asarray([table.get("q50"), table.get("q99")], dtype=float)
        ok = np.isfinite(q).all() and q[0] <= q[1]
    scale = table.get("scale", 1.0)
    if not ok or not is_finite(scale) or scale <= 0:
        raise ValueError(
            f"{name} table is not {len(LEVELS)} finite rising quantiles (or q50 <= q99) with a "
            "positive scale"
        )
