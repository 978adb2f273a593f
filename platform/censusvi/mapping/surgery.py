"""Query mapping by architecture surgery, as scArches does it for scVI.

New batch categories become new one-hot columns of every layer that reads the batch (the decoder;
the encoders too when the model encodes covariates) and new columns of a gene-batch dispersion.
Every reference weight is frozen: after each optimiser step the reference entries are restored
exactly (Adam's weight decay would otherwise still move them), and batch-norm statistics stay as
the reference left them. So reference cells embed bit-identically before and after mapping.

With ``encode_covariates=False`` (the Census model) the encoder never sees the batch: the query's
latent needs no training, and the new decoder columns start as the mean of the reference batches'
columns (an "average batch"). Training, when asked for or when the encoder reads the batch,
fits only the new columns, with early stopping on the query loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from censusvi.defaults import SURGERY_MAX_EPOCHS
from censusvi.model.io import TrainedModel
from censusvi.model.layers import InjectedLinear
from censusvi.model.vae import VAE
from censusvi.numeric import is_whole
from censusvi.typed import check_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurgeryConfig:
    max_epochs: int = SURGERY_MAX_EPOCHS  # scvi-tools allows up to 400 on a small query; early stopping ends sooner
    lr: float = 1e-3
    batch_size: int = 1024
    patience: int = 5
    min_delta: float = 0.5  # in nats per cell: smaller gains are noise at these epoch counts
    weight_decay: float = 0.0
    seed: int = 0
    train: bool | None = None  # None: train only when the encoder reads the batch

    def __post_init__(self) -> None:
        epochs = self.max_epochs
        if self.train is not False and not (is_whole(epochs) and epochs >= 1):
            raise ValueError(
                f"max_epochs={self.max_epochs!r}: surgery needs at least 1 epoch (default "
                f"{SURGERY_MAX_EPOCHS}); without training new batches, pass --no-train"
            )
        check_ranges(self, ("lr", "batch_size", "patience", "min_delta", "weight_decay"))


def _batch_linears(vae: VAE) -> list[InjectedLinear]:
    """Every layer whose input includes the batch one-hot."""
    mods = [vae.decoder.fc]
    if vae.cfg.encode_covariates:
        mods.append(vae.z_encoder.fc)
        if vae.l_encoder is not None:
            mods.append(vae.l_encoder.fc)
    return [lin for fc in mods for lin in fc.linears]


def extend_batches(
    ref: TrainedModel, new_batches: list[str]
) -> tuple[TrainedModel, dict[str, torch.Tensor]]:
    """A copy of ``ref`` with ``new_batches`` appended; returns it and a frozen-entry mask per parameter."""
    n_ref, n_new = len(ref.batch_categories), len(new_batches)
    cfg = replace(ref.config, n_batches=n_ref + n_new)
    vae = VAE(cfg)
    ref_state = ref.vae.state_dict()
    new_state = vae.state_dict()
    trainable: dict[str, torch.Tensor] = {}
    batch_ids = {id(m) for m in _batch_linears(ref.vae)}
    batch_layers = {name for name, m in ref.vae.named_modules() if id(m) in batch_ids}
    for key, new in new_state.items():
        old = ref_state[key]
        if key.endswith(".linear.weight") and key.removesuffix(".linear.weight") in batch_layers:
            n_in = old.shape[1] - sum(ref.config.covariate_sizes)
            start, stop = n_in + n_ref, n_in + n_ref + n_new  # new columns after the reference's
            new[:, :start] = old[:, :start]
            new[:, start:stop] = old[:, n_in:start].mean(1, keepdim=True)
            new[:, stop:] = old[:, start:]
            mask = torch.zeros_like(new, dtype=torch.bool)
            mask[:, start:stop] = True
            trainable[key] = mask
        elif key == "px_r" and old.dim() == 2:  # gene-batch dispersion
            new[:, :n_ref] = old
            new[:, n_ref:] = old.mean(1, keepdim=True)
            mask = torch.zeros_like(new, dtype=torch.bool)
            mask[:, n_ref:] = True
            trainable[key] = mask
        elif key in ("library_log_means", "library_log_vars"):
            new[:n_ref] = old
            new[n_ref:] = old.mean()
        else:
            new.copy_(old)
    vae.load_state_dict(new_state)
    mapped = TrainedModel(
        vae.eval(),
        ref.genes,
        ref.batch_keys,
        (*ref.batch_categories, *new_batches),
        {  # every mapping's batches, in column order (a model mapped twice: both rounds')
            **ref.provenance,
            "mapped_batches": [*(ref.provenance.get("mapped_batches") or ()), *new_batches],
        },
        ref.covariate_keys,
        ref.covariate_categories,
    )
    return mapped, trainable


def _freeze(vae: VAE, trainable: dict[str, torch.Tensor]):
    """Make only the masked entries learnable; returns the restore hook and the parameters to train."""
    params = dict(vae.named_parameters())
    frozen = {k: p.detach().clone() for k, p in params.items()}
    for k, p in params.items():
        p.requires_grad_(k in trainable)

    @torch.no_grad()
    def restore() -> None:
        for k, mask in trainable.items():
            p = params[k]
            p.copy_(torch.where(mask, p, frozen[k]))

    return restore, [params[k] for k in trainable]


def train_new_columns(
    mapped: TrainedModel, trainable: dict[str, torch.Tensor], batches, cfg: SurgeryConfig
) -> list[float]:
    """Fit only the new batch columns on the query; returns the per-epoch query loss.

    ``batches(epoch)`` yields the query's minibatches for that epoch.
    """
    from censusvi.train.loop import epoch_seeds, train_epoch

    vae = mapped.vae
    restore, params = _freeze(vae, trainable)
    losses: list[float] = []
    try:
        if not params:
            return losses
        opt = torch.optim.Adam(params, lr=cfg.lr, eps=0.01, weight_decay=cfg.weight_decay)
        best, bad = float("inf"), 0
        for epoch in range(cfg.max_epochs):
            torch.manual_seed(epoch_seeds(cfg.seed, epoch).torch)
            loss, _ = train_epoch(
                vae, opt, batches(epoch), 1.0, after_step=restore, freeze_batchnorm=True
            )
            losses.append(loss)
            best, bad = (loss, 0) if loss < best - cfg.min_delta else (best, bad + 1)
            if bad >= cfg.patience:
                break
        log.info("surgery: %d epochs, query loss %.1f -> %.1f", len(losses), losses[0], losses[-1])
    finally:
        for p in vae.parameters():
            p.requires_grad_(True)
        vae.eval()
    return losses


def query_batches(labels: np.ndarray, known: tuple[str, ...]) -> list[str]:
    """The query's batch labels the reference does not know, in order of first appearance."""
    seen = dict.fromkeys(str(b) for b in labels)
    return [b for b in seen if b not in set(known)]
