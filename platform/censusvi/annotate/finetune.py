"""Semi-supervised fine-tuning of a reference model with its labels: scANVI's second stage.

scvi-tools trains scANVI from a trained scVI (``SCANVI.from_scvi_model``): a few more epochs in
which a classifier on the latent adds its cross-entropy, times ``classification_ratio`` (50), to
the ELBO; unlabelled cells add the ELBO only. This does that to a censusvi model: every weight
trains, the classifier reads the posterior mean (scANVI's ``use_posterior_mean``), and it is
dropped afterwards. Unlike scANVI, the generative model stays scVI's (no label-conditioned
prior over the latent), and the KL term keeps its full weight: scvi-tools' semi-supervised plan
warms it up from 0 over 400 epochs, so its 2 to 10 fine-tuning epochs run at a KL weight of at
most 0.025, which would let the latent drift from the prior the reference was trained under
(that ramp was measured and was no better: bench/RESULTS.md). The result is an ordinary model
(same architecture, genes, batches): map, index, register and serve it as any other; the index
trains and calibrates its own head on the fine-tuned latent (``annotate.head``).

The labels of the cells an index of the same reference calibrates on (``head.calibration_rows``
over the cells with counts, seed 0) are withheld, so its temperature and its out-of-reference
fit still read cells whose labels the encoder was never taught.

Epochs: scvi-tools' rule for a scANVI started from a trained scVI, ``min(10, max(2,
round(E / 3)))`` with E its scVI epoch heuristic: 10 up to ~280,000 cells, 2 above ~1.07 M.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from censusvi import defaults
from censusvi.annotate.head import HIDDEN, calibration_rows
from censusvi.data.cells import Cells
from censusvi.data.h5ad import H5adSource
from censusvi.data.labels import UNLABELLED
from censusvi.data.labels import unlabelled as is_unlabelled
from censusvi.inference import reference_cells
from censusvi.model.device import check_local_device
from censusvi.model.io import UNKNOWN_BATCH_FIX_REFERENCE, TrainedModel
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.progress import bar
from censusvi.train.schedule import ADAM_EPS, scvi_tools_max_epochs
from censusvi.typed import check_ranges

log = logging.getLogger(__name__)
IGNORE = -100  # torch's cross-entropy ignore_index


@dataclass(frozen=True)
class FinetuneConfig:
    max_epochs: int | None = None  # None: scvi-tools' rule for a scANVI from a trained scVI
    classification_ratio: float = defaults.CLASSIFICATION_RATIO
    lr: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 128
    seed: int = 0
    withhold_calibration: bool = True  # keep the index's calibration cells unlabelled here
    device: str = "cpu"  # where the epochs run ("cuda" on a GPU); the result is on the CPU

    def __post_init__(self) -> None:
        names = ("max_epochs", "classification_ratio", "lr", "weight_decay", "batch_size")
        check_ranges(self, names, unset=("max_epochs",))
        check_local_device(self.device)


def scanvi_epochs(n_cells: int) -> int:
    """scvi-tools 1.4.2's epochs for ``SCANVI.train`` after ``from_scvi_model``."""
    return int(min(10, max(2, round(scvi_tools_max_epochs(n_cells) / 3.0))))


def label_codes(values, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(classes, code per cell); unlabelled cells (NaN, "", "unknown", ...) get ``IGNORE``."""
    text = pd.Series(values).astype("string").fillna("").str.strip()
    unlabelled = is_unlabelled(values)
    classes, codes = np.unique(text[~unlabelled].to_numpy(str), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"{where}: {len(classes)} labelled type(s) ({classes.tolist()}); fine-tuning needs at "
            f"least two (cells labelled {list(UNLABELLED[1:])} or empty count as unlabelled)"
        )
    out = np.full(len(text), IGNORE, dtype=np.int64)
    out[~unlabelled] = codes
    return classes, out


def _classifier(n_latent: int, n_classes: int) -> nn.Module:
    """scANVI's classifier: one hidden layer of 128 units, dropout 0.1."""
    return nn.Sequential(
        nn.Linear(n_latent, HIDDEN), nn.ReLU(), nn.Dropout(0.1), nn.Linear(HIDDEN, n_classes)
    )


def _epoch(vae, clf, opt, cells: Cells, y: torch.Tensor, cfg: FinetuneConfig, epoch: int):
    """One pass; returns (mean ELBO, mean cross-entropy, accuracy) over the cells seen."""
    elbo = ce_sum = right = n = n_lab = 0.0
    device = y.device
    for pos, x, cov in cells.minibatches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
        mb = minibatch_from_csr(x, cov, device, with_counts=vae.needs_dense_counts)
        loss = vae.loss(mb, kl_weight=1.0).loss
        elbo += float(loss.detach()) * len(pos)
        n += len(pos)
        target = y[torch.from_numpy(pos).to(device)]
        labelled = target != IGNORE
        if labelled.any():
            logits = clf(vae.inference(mb, sample=False).qz_mean_nk)
            ce = nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
            loss = loss + cfg.classification_ratio * ce
            k = int(labelled.sum())
            ce_sum += float(ce.detach()) * k
            right += float((logits.argmax(1) == target)[labelled].sum())
            n_lab += k
        opt.zero_grad()
        loss.backward()
        opt.step()
    return elbo / max(n, 1), ce_sum / max(n_lab, 1), right / max(n_lab, 1)


def training_labels(
    source: H5adSource, labels_key: str, cells: Cells, withhold: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(classes, code per obs row or ``IGNORE``, the rows with counts, labelled cells withheld).
    The rows with counts are the cells an index of this reference embeds, in order: its
    calibration rows (``head.calibration_rows``, seed 0) are drawn over them."""
    if labels_key not in source.obs.columns:
        raise ValueError(
            f"{source.uri}: label key {labels_key!r} is not in obs; it has "
            f"{sorted(map(str, source.obs.columns))[:20]}"
        )
    rows = [pos for pos, _, _ in cells.minibatches(4096, shuffle=False)]
    if not rows:
        raise ValueError(
            f"{source.uri}: all {len(cells)} cells have zero counts over the model's genes; "
            "none is left to fine-tune on"
        )
    with_counts = np.concatenate(rows)
    classes, codes = label_codes(source.obs[labels_key].to_numpy(), source.uri)
    y = np.full(len(codes), IGNORE, dtype=np.int64)
    y[with_counts] = codes[with_counts]
    withheld = 0
    if withhold:
        calib = with_counts[calibration_rows(len(with_counts), np.random.default_rng(0))]
        withheld = int((y[calib] != IGNORE).sum())
        y[calib] = IGNORE
    left = np.unique(y[y != IGNORE])
    if len(left) < 2:
        raise ValueError(
            f"{source.uri}: {len(left)} labelled type(s) of {labels_key!r} left among the cells "
            f"with counts ({withheld} withheld for the index's calibration); fine-tuning needs "
            "at least two"
        )
    return classes, y, with_counts, withheld


def finetune(
    model: TrainedModel, source: H5adSource, labels_key: str, cfg: FinetuneConfig | None = None
) -> TrainedModel:
    """A copy of ``model`` fine-tuned on ``source``'s cells (batches the model knows) with the
    labels in ``labels_key``, returned on the CPU; its provenance records what was done
    (``"finetune"``)."""
    cfg = cfg or FinetuneConfig()
    cells, genes = reference_cells(model, source, unknown_batch_fix=UNKNOWN_BATCH_FIX_REFERENCE)
    cells = replace(cells, preload=None)  # small references are read once, not every epoch
    classes, y, with_counts, withheld = training_labels(
        source, labels_key, cells, cfg.withhold_calibration
    )
    epochs = cfg.max_epochs or scanvi_epochs(len(with_counts))
    device = torch.device(cfg.device)
    out = replace(model, vae=copy.deepcopy(model.vae).to(device))
    vae = out.vae.train()
    torch.manual_seed(cfg.seed)
    clf = _classifier(vae.cfg.n_latent, len(classes)).to(device)
    params = [p for p in vae.parameters() if p.requires_grad] + list(clf.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=ADAM_EPS, weight_decay=cfg.weight_decay)
    target = torch.from_numpy(y).to(device)
    history = []
    for epoch in bar(range(epochs), desc="finetune", unit="epoch"):
        elbo, ce, acc = _epoch(vae, clf.train(), opt, cells, target, cfg, epoch)
        if not (math.isfinite(elbo) and math.isfinite(ce)):
            raise FloatingPointError(
                f"fine-tuning diverged: the loss became {elbo + cfg.classification_ratio * ce} "
                f"at epoch {epoch}; lower --classification-ratio ({cfg.classification_ratio:g}) "
                f"or the learning rate (lr={cfg.lr:g}); nothing was written"
            )
        history.append({"elbo": round(elbo, 3), "classification_loss": round(ce, 4),
                        "accuracy": round(acc, 4)})  # fmt: skip
        log.info("fine-tune epoch %d/%d: ELBO %.1f, cross-entropy %.3f, accuracy %.3f",
                 epoch + 1, epochs, elbo, ce, acc)  # fmt: skip
    out.vae = vae.eval().cpu()
    report = {
        "labels_key": labels_key,
        "classes": classes.tolist(),
        "labelled_cells": int((y != IGNORE).sum()),
        "withheld_cells": withheld,
        "cells": len(with_counts),
        "epochs": epochs,
        "genes": genes,
        "settings": asdict(cfg),
        "history": history,
    }
    out.provenance = {**model.provenance, "finetune": report}
    return out
