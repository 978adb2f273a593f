"""#20 study (session 20): a monotone recalibration of the combined confidence, measured.

A larger ALPHA (the in-reference probability's tail share) ranks left-out types better but marks
reference-like cells down, so the confidence falls below the accuracy. A monotone map g of the
confidence keeps the ranking (the novel-type AUROC is unchanged), so: does g restore the
calibration at a larger ALPHA? For the models ``bench/annotation.py --model-cache`` saved, each
index (full, and each novel type left out), the in-reference probability (Fisher: distance +
entropy) at each ALPHA, combined with the ensemble as censusvi does; g = isotonic fit of the
head's top probability x the in-reference probability -> correct, on half A of the index's
held-out reference rows; ECE on half B raw and through g, and ECE of the query's known types
(full index) raw and through g. The committed default (ALPHA 0.01, raw) is checked to reproduce
censusvi's own answer.

Usage: python bench/annotation_recalibration.py --families pbmc-rotation --cache DIR
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

ALPHAS = (0.01, 0.05, 0.1, 0.2)


def evaluate(ix, z_ix, lab_ix, z_q, truth, left_out):
    own = ix.heads[KEY]
    rows = novelty_rows(len(z_ix), 0)
    kk = min(defaults.K + 1, ix.index.ntotal)
    d_ref = ix.search(z_ix[rows], kk)[0][:, 1:].mean(1)
    p_r = own.probabilities(z_ix[rows])
    ent_r = novelty.entropy(p_r)
    ok_r = own.classes[p_r.argmax(1)] == lab_ix[rows]
    half = np.random.default_rng(1).permutation(len(rows)) < len(rows) // 2
    dist, idx = ix.search(z_q, defaults.K)
    p_q = own.probabilities(z_q)
    sq = {"distance": dist.mean(1), "entropy": novelty.entropy(p_q)}
    held = truth != ""
    keep = held & (truth != left_out) if left_out else held
    committed = transfer_all(ix, z_q, method="ensemble")[KEY]["uncertainty"].to_numpy()
    out = []
    for alpha in ALPHAS:
        fitted = novelty.fit({"distance": d_ref, "entropy": ent_r})
        in_r = novelty.in_reference({"distance": d_ref, "entropy": ent_r}, fitted, alpha)
        in_q = novelty.in_reference(sq, fitted, alpha)
        cats, prob = label_probabilities_by(
            "ensemble", ix, KEY, dist, idx, defaults.CLASS_BALANCE, in_q, p_q.copy()
        )
        res = summarise(cats, prob)
        unc, conf = res["uncertainty"].to_numpy(), res["probability"].to_numpy()
        if alpha == 0.01:
            assert np.abs(unc - committed).max() < 1e-9, "committed default not reproduced"
        pred = res["predicted"].to_numpy().astype(str)
        c_r = p_r.max(1) * in_r
        g = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(c_r[half], ok_r[half])
        row = {"left_out": left_out, "alpha": alpha,
               "ece_ref_raw": ece(c_r[~half], ok_r[~half]),
               "ece_ref_iso": ece(g.predict(c_r[~half]), ok_r[~half]),
               "ece_q_raw": ece(conf[keep], pred[keep] == truth[keep]),
               "ece_q_iso": ece(g.predict(conf[keep]), pred[keep] == truth[keep])}  # fmt: skip
        if left_out:
            row["auroc"] = roc_auc_score(truth[held] == left_out, unc[held])
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="pbmc-rotation")
    p.add_argument("--cache", required=True, help="bench/annotation.py --model-cache's folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rows = []
    for split in splits.load(a.families.split(",")):
        name = re.sub(r"\W+", "_", f"{split.family}_{split.name}_seed{a.seed}_auto")
        if not (Path(a.cache) / name).is_dir():
            print(f"{split.name}: no cached model {name}: run bench/annotation.py first")
            continue
        model = censusvi.load_model(Path(a.cache) / name)
        pos, z_ref, _ = latent_representation(model, H5adSource(IN_MEMORY, adata=split.ref))
        labels = split.ref.obs[KEY].astype(str).to_numpy()[pos]
        q = split.query.copy()
        censusvi.map_query(q, model)
        for t in ["", *novel_types(split)]:
            ref = split.ref if not t else split.ref[split.ref.obs[KEY] != t].copy()
            keep = labels != t
            for r in evaluate(censusvi.build_index(ref, model), z_ref[keep], labels[keep],
                              q.obsm["X_scvi"], split.truth, t):  # fmt: skip
                rows.append({"split": split.name, **r})
    df = pd.DataFrame(rows)
    lo, full = df[df.left_out != ""], df[df.left_out == ""]
    per = lo.groupby(["split", "alpha"]).agg(
        A=("auroc", "mean"),
        ece_ref_raw=("ece_ref_raw", "mean"),
        ece_ref_iso=("ece_ref_iso", "mean"),
    )
    per = per.join(full.set_index(["split", "alpha"])[["ece_q_raw", "ece_q_iso"]])
    print(per.round(3).to_string())
    print(per.groupby("alpha").mean().round(3).to_string())


if __name__ == "__main__":
    main()
