"""#20 study (sessions 20-21): a monotone recalibration of the combined confidence, measured.

A larger ALPHA (the in-reference probability's tail share) ranks left-out types better but marks
reference-like cells down, so the confidence falls below the accuracy. Can a monotone map g of
the confidence, fitted on held-out reference cells, restore the calibration at a larger ALPHA?

For the models ``bench/annotation.py --model-cache`` saved, each index (full, and each novel type
left out), at each ALPHA: the in-reference probability (Fisher: distance + entropy) combined with
the ensemble as censusvi does, on the index's held-out reference rows (kNN without the cell
itself) and on the query. g = isotonic fit of that confidence -> correct on all held-out rows.

Per index and ALPHA: ECE on the held-out rows raw and 2-fold cross-fitted; ECE of the query's known
types (full index) raw and through g; novel-type AUROC of the raw uncertainty, of g as a step
function (the isotonic fit: ties), of g interpolated between its knots, and of the mix
0.98 g + 0.02 x (strictly increasing: the raw ranking); the share of the left-out type's cells
and of the held types' cells with an uncertainty above 0.5, raw and through the mix. The
committed default (ALPHA 0.01, raw) is checked to reproduce censusvi's own answer.

Usage: python bench/annotation_recalibration.py --families pbmc-rotation --cache DIR --out F.csv
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

import annotation_splits as splits
import censusvi
from annotation import KEY, novel_types
from censusvi import defaults
from censusvi.annotate import novelty
from censusvi.annotate.method import label_probabilities_by
from censusvi.annotate.pipeline import IN_MEMORY, novelty_rows, transfer_all
from censusvi.annotate.transfer import expected_calibration_error as ece
from censusvi.annotate.transfer import summarise
from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation

ALPHAS = (0.01, 0.1, 0.2, 0.3)
MIX = 0.02  # share of the raw confidence in the strictly increasing map


def isotonic(x: np.ndarray, y: np.ndarray) -> IsotonicRegression:
    return IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(x, y)


def ensemble(ix, dist, idx, in_ref, p_head):
    cats, prob = label_probabilities_by(
        "ensemble", ix, KEY, dist, idx, defaults.CLASS_BALANCE, in_ref, p_head.copy()
    )
    res = summarise(cats, prob)
    return res["predicted"].to_numpy().astype(str), res["probability"].to_numpy()


def signals(ix, z, k, drop_self):
    dist, idx = ix.search(z, k + drop_self)
    dist, idx = dist[:, drop_self:], idx[:, drop_self:]
    p = ix.heads[KEY].probabilities(z)
    return dist, idx, p, {"distance": dist.mean(1), "entropy": novelty.entropy(p)}


def novel_rows(y, unc, conf, g, row):
    """AUROC and flagged shares of the left-out type's cells (``y``) for each reading of g."""
    interp = np.interp(conf, g.X_thresholds_, g.y_thresholds_)
    mix = (1 - MIX) * interp + MIX * conf
    row["auroc"] = roc_auc_score(y, unc)
    row["auroc_step"] = roc_auc_score(y, -g.predict(conf))
    row["auroc_interp"] = roc_auc_score(y, -interp)
    row["auroc_mix"] = roc_auc_score(y, -mix)
    row["flag_novel_raw"], row["flag_known_raw"] = (unc[y] > 0.5).mean(), (unc[~y] > 0.5).mean()
    row["flag_novel_mix"], row["flag_known_mix"] = (mix[y] < 0.5).mean(), (mix[~y] < 0.5).mean()


def evaluate(ix, z_ix, lab_ix, z_q, truth, left_out):
    rows = novelty_rows(len(z_ix), 0)
    dr, ir, p_r, s_r = signals(ix, z_ix[rows], min(defaults.K, ix.index.ntotal - 1), 1)
    dist, idx, p_q, s_q = signals(ix, z_q, defaults.K, 0)
    held = truth != ""
    keep = held & (truth != left_out) if left_out else held
    fitted = novelty.fit(s_r)
    fold = np.random.default_rng(1).permutation(len(rows)) % 2 == 0
    committed = transfer_all(ix, z_q, method="ensemble")[KEY]["uncertainty"].to_numpy()
    out = []
    for alpha in ALPHAS:
        pred_r, conf_r = ensemble(ix, dr, ir, novelty.in_reference(s_r, fitted, alpha), p_r)
        ok_r = pred_r == lab_ix[rows]
        pred, conf = ensemble(ix, dist, idx, novelty.in_reference(s_q, fitted, alpha), p_q)
        if alpha == 0.01:
            assert np.abs(1 - conf - committed).max() < 1e-9, "committed default not reproduced"
        ok_q = pred[keep] == truth[keep]
        g = isotonic(conf_r, ok_r)
        cross = np.empty(len(rows))
        for f in (fold, ~fold):
            cross[~f] = isotonic(conf_r[f], ok_r[f]).predict(conf_r[~f])
        mix_q = (1 - MIX) * np.interp(conf[keep], g.X_thresholds_, g.y_thresholds_)
        row = {"left_out": left_out, "alpha": alpha, "knots": len(g.X_thresholds_),
               "ece_ref_raw": ece(conf_r, ok_r), "ece_ref_cross": ece(cross, ok_r),
               "ece_q_raw": ece(conf[keep], ok_q), "ece_q_step": ece(g.predict(conf[keep]), ok_q),
               "ece_q_mix": ece(mix_q + MIX * conf[keep], ok_q)}  # fmt: skip
        if left_out:
            novel_rows(truth[held] == left_out, 1 - conf[held], conf[held], g, row)
        out.append(row)
    return out


def run(families: list[str], cache: Path, seed: int) -> pd.DataFrame:
    rows = []
    for split in splits.load(families):
        name = re.sub(r"\W+", "_", f"{split.family}_{split.name}_seed{seed}_auto")
        if not (cache / name).is_dir():
            print(f"{split.name}: no cached model {name}: run bench/annotation.py first")
            continue
        model = censusvi.load_model(cache / name)
        pos, z_ref, _ = latent_representation(model, H5adSource(IN_MEMORY, adata=split.ref))
        labels = split.ref.obs[KEY].astype(str).to_numpy()[pos]
        q = split.query.copy()
        censusvi.map_query(q, model)
        for t in ["", *novel_types(split)]:
            ref = split.ref if not t else split.ref[split.ref.obs[KEY] != t].copy()
            keep = labels != t
            for r in evaluate(censusvi.build_index(ref, model), z_ref[keep], labels[keep],
                              q.obsm["X_scvi"], split.truth, t):  # fmt: skip
                rows.append({"family": split.family, "split": split.name, "seed": seed, **r})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> str:
    """Means per split and seed, then over them, per family and ALPHA."""
    lo, full = df[df.left_out.fillna("") != ""], df[df.left_out.fillna("") == ""]
    novel = [c for c in lo.columns if c.startswith(("auroc", "flag"))]
    per = lo.groupby(["family", "split", "seed", "alpha"])[novel].mean()
    ece_cols = [c for c in full.columns if c.startswith("ece")]
    both = per.join(full.set_index(["family", "split", "seed", "alpha"])[ece_cols])
    fam = both.groupby(["family", "alpha"]).mean()
    every = (
        both.groupby("alpha").mean().assign(family="every split").set_index("family", append=True)
    )
    return pd.concat([fam, every.swaplevel()]).round(3).to_string()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="pbmc-rotation")
    p.add_argument("--cache", required=True, help="bench/annotation.py --model-cache's folder")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", help="also write every row to this CSV")
    a = p.parse_args()
    df = pd.concat([run(a.families.split(","), Path(a.cache), int(s)) for s in a.seeds.split(",")])
    if a.out:
        df.to_csv(a.out, index=False)
    print(summary(df))


if __name__ == "__main__":
    main()
