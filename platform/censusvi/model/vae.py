"""The scVI variational autoencoder (Lopez et al. 2018), faithful to scvi-tools' ``VAE``.

inference: log1p(x) -> encoder -> q(z|x) = N(m, exp(v) + 1e-4), z by reparameterisation;
  library = log(sum x) (observed) or a second encoder's sample (latent, with a per-batch prior).
generative: [z, batch] -> decoder -> softmax gene scale; rate = exp(library) * scale;
  dispersion theta = exp(px_r) per gene (or per gene and batch).
loss: -log p(x | rate, theta) + kl_weight * KL(q(z|x) || p(z)) (+ the library KL), averaged;
  p(z) = N(0, I), or with ``prior_components`` K a VampPrior: (1/K) sum_k q(z | pseudo-cell k).

What scvi-tools builds but an NB model never uses (the zero-inflation head, ``l_encoder`` with the
observed library, ``px_r_decoder``) is not built here. Shapes: n cells, g genes, h hidden,
k latent, c covariates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

from censusvi.model.config import ModelConfig
from censusvi.model.fused_nb import nb_nll_from_logits
from censusvi.model.layers import FCLayers, SparseRows
from censusvi.model.likelihoods import (
    full_precision,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    nb_log_prob_sum_sparse,
    poisson_log_prob_sum_sparse,
)
from censusvi.model.minibatch import Minibatch

VAR_EPS = 1e-4  # scvi-tools' floor on the posterior variance; keeps q(z|x) from collapsing


def _normal(loc: torch.Tensor | float, scale: torch.Tensor | float) -> Normal:
    """N(loc, scale) without torch's argument check: a diverged run's NaN then reaches the loss,
    where the training loop's guard names the epoch and the fix (torch's check would raise first,
    naming only a tensor), and the check's host sync on a GPU is skipped."""
    return Normal(loc, scale, validate_args=False)


@dataclass(frozen=True)
class Inference:
    qz_mean_nk: torch.Tensor
    qz_var_nk: torch.Tensor
    z_nk: torch.Tensor
    log_library_n1: torch.Tensor
    ql_mean_n1: torch.Tensor | None = None
    ql_var_n1: torch.Tensor | None = None


@dataclass(frozen=True)
class Generative:
    scale_ng: torch.Tensor  # softmax over genes: expected fraction of the cell's counts
    rate_ng: torch.Tensor  # expected counts: library * scale
    theta: torch.Tensor  # inverse dispersion, (g,) or (n, g)
    zi_logits_ng: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar: mean over cells of reconstruction + kl_weight * KL
    reconstruction_n: torch.Tensor  # -log p(x | z)
    kl_n: torch.Tensor  # KL of z plus, with a latent library, the library's KL

    @property
    def elbo_n(self) -> torch.Tensor:
        """Negative ELBO per cell at full KL weight (what validation reports)."""
        return self.reconstruction_n + self.kl_n


class GaussianEncoder(nn.Module):
    """FC stack -> mean and variance of a diagonal Gaussian (scvi-tools' ``Encoder``)."""

    def __init__(self, n_in: int, n_out: int, cfg: ModelConfig, n_layers: int) -> None:
        super().__init__()
        covs = cfg.covariate_sizes if cfg.encode_covariates else ()
        self.fc = FCLayers(n_in, cfg.n_hidden, n_layers, covs, cfg.dropout_rate)
        self.mean = nn.Linear(cfg.n_hidden, n_out)
        self.var = nn.Linear(cfg.n_hidden, n_out)
        self.encode_covariates = cfg.encode_covariates

    def forward(
        self, h_ng: torch.Tensor, covariates_nc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.fc(h_ng, covariates_nc if self.encode_covariates else None)
        # under bf16 autocast the layers compute in bf16, the likelihood stays fp32
        return full_precision(self.mean(q)), torch.exp(full_precision(self.var(q))) + VAR_EPS


class Decoder(nn.Module):
    """[z, covariates] -> gene scale (softmax), and zero-inflation logits for ZINB."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = FCLayers(cfg.n_latent, cfg.n_hidden, cfg.n_layers, cfg.covariate_sizes, 0.0)
        self.scale = nn.Linear(cfg.n_hidden, cfg.n_genes)
        self.zi_logits = nn.Linear(cfg.n_hidden, cfg.n_genes) if cfg.likelihood == "zinb" else None

    def forward(
        self, z_nk: torch.Tensor, covariates_nc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.fc(z_nk, covariates_nc)
        zi = full_precision(self.zi_logits(h)) if self.zi_logits is not None else None
        return full_precision(self.scale(h)), zi


class VAE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_encoder = GaussianEncoder(cfg.n_genes, cfg.n_latent, cfg, cfg.n_layers)
        self.l_encoder = (
            GaussianEncoder(cfg.n_genes, 1, cfg, n_layers=1) if cfg.latent_library else None
        )
        self.decoder = Decoder(cfg)
        if cfg.likelihood != "poisson":
            shape = (cfg.n_genes,) if cfg.dispersion == "gene" else (cfg.n_genes, cfg.n_batches)
            self.px_r = nn.Parameter(torch.randn(shape))  # log theta, scvi-tools' init
        else:
            self.px_r = None
        # Prior of the latent log library per batch; set from training data by the trainer.
        self.register_buffer("library_log_means", torch.zeros(cfg.n_batches))
        self.register_buffer("library_log_vars", torch.ones(cfg.n_batches))
        if cfg.prior_components:  # log1p counts of K pseudo-cells, and their covariates
            k, n_cov = cfg.prior_components, len(cfg.covariate_sizes)
            self.pseudo_inputs_kg = nn.Parameter(torch.zeros(k, cfg.n_genes))
            self.register_buffer("pseudo_covariates_kc", torch.zeros(k, n_cov, dtype=torch.long))

    @torch.no_grad()
    def set_pseudo_inputs(self, counts_kg: Any, covariates_kc: np.ndarray) -> None:
        """Start the VampPrior's pseudo-cells at real training cells (sysVI's data init): counts
        (dense or CSR, K cells) and their covariate codes. Random starts sit far from any cell."""
        counts = counts_kg.toarray() if hasattr(counts_kg, "toarray") else np.asarray(counts_kg)
        if counts.shape != tuple(self.pseudo_inputs_kg.shape):
            raise ValueError(f"pseudo-inputs need {tuple(self.pseudo_inputs_kg.shape)} counts")
        self.pseudo_inputs_kg.copy_(torch.log1p(torch.as_tensor(counts, dtype=torch.float32)))
        self.pseudo_covariates_kc.copy_(torch.as_tensor(covariates_kc, dtype=torch.long))

    @torch.no_grad()
    def set_library_prior(self, blocks: Iterable[tuple[Any, np.ndarray]]) -> None:
        """The latent library's prior: per-batch mean and variance of log library size over
        ``blocks`` of (counts CSR, batch codes), one pass (the training cells, streamed)."""
        n_batches = self.cfg.n_batches
        s1, s2, n = np.zeros(n_batches), np.zeros(n_batches), np.zeros(n_batches)
        for x, batch in blocks:
            log_lib = np.log(np.asarray(x.sum(1)).ravel())
            np.add.at(s1, batch, log_lib)
            np.add.at(s2, batch, log_lib**2)
            np.add.at(n, batch, 1)
        mean = s1 / np.maximum(n, 1)
        var = np.maximum(s2 / np.maximum(n, 1) - mean**2, 1e-4)
        self.library_log_means.copy_(torch.tensor(mean, dtype=torch.float32))
        self.library_log_vars.copy_(torch.tensor(var, dtype=torch.float32))

    @property
    def needs_dense_counts(self) -> bool:
        """Whether the loss reads dense raw counts (ZINB); NB and Poisson use non-zeros only."""
        return self.cfg.likelihood == "zinb"

    def inference(self, mb: Minibatch, sample: bool = True) -> Inference:
        """q(z|x) from log1p counts; the observed library is ``mb.log_library_n1``."""
        return self._inference(mb, sample)[0]

    def _inference(
        self, mb: Minibatch, sample: bool, with_prior: bool = False
    ) -> tuple[Inference, tuple[torch.Tensor, torch.Tensor] | None]:
        """Also the VampPrior's components when ``with_prior``: the pseudo-cells go through the
        encoder in the same pass as the cells, so batch norm sees one batch, as in training."""
        h_ng, covariates_nc = mb.h_ng, mb.covariates_nc
        n, prior = h_ng.shape[0], None
        if with_prior and self.cfg.prior_components:
            dense = h_ng.to_dense() if isinstance(h_ng, SparseRows) else h_ng
            m, v = self.z_encoder(
                torch.cat([dense, self.pseudo_inputs_kg]),
                torch.cat([covariates_nc, self.pseudo_covariates_kc]),
            )
            (qz_m, prior_m), (qz_v, prior_v) = m.split([n, len(m) - n]), v.split([n, len(v) - n])
            prior = (prior_m, prior_v)
        else:
            qz_m, qz_v = self.z_encoder(h_ng, covariates_nc)
        z = qz_m + qz_v.sqrt() * torch.randn_like(qz_m) if sample else qz_m
        if self.l_encoder is None:
            return Inference(qz_m, qz_v, z, mb.log_library_n1), prior
        ql_m, ql_v = self.l_encoder(h_ng, covariates_nc)
        log_lib = ql_m + ql_v.sqrt() * torch.randn_like(ql_m) if sample else ql_m
        return Inference(qz_m, qz_v, z, log_lib, ql_m, ql_v), prior

    @staticmethod
    def kl_z_n(
        inf: Inference, prior: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per cell: closed form for N(0, I); for a VampPrior (no closed
        form) the one-sample estimate log q(z|x) - log p(z) at the z the decoder saw."""
        qz = _normal(inf.qz_mean_nk, inf.qz_var_nk.sqrt())
        if prior is None:
            return kl_divergence(qz, _normal(0.0, 1.0)).sum(-1)
        prior_m, prior_v = prior
        z = inf.z_nk
        log_p_nk = _normal(prior_m, prior_v.sqrt()).log_prob(z[:, None]).sum(-1)
        log_p = torch.logsumexp(log_p_nk, 1) - math.log(prior_m.shape[0])
        return qz.log_prob(z).sum(-1) - log_p

    def generative(
        self, z_nk: torch.Tensor, log_library_n1: torch.Tensor, covariates_nc: torch.Tensor
    ) -> Generative:
        logits_ng, zi = self.decoder(z_nk, covariates_nc)
        scale_ng = F.softmax(logits_ng, dim=-1)
        rate_ng = torch.exp(log_library_n1) * scale_ng
        return Generative(scale_ng, rate_ng, self._theta(covariates_nc), zi)

    def scale_gn(self, z_nk: torch.Tensor, covariates_nc: torch.Tensor) -> torch.Tensor:
        """The decoded scale transposed, genes x cells: posterior sampling (DE) reduces per gene
        over many draws, and computing W h^T straight into that layout avoids a transposing
        copy of every draw."""
        h_nh = self.decoder.fc(z_nk, covariates_nc)
        layer = self.decoder.scale
        logits_gn = torch.addmm(layer.bias[:, None], layer.weight, h_nh.T)
        logits_gn -= logits_gn.amax(0, keepdim=True)
        return logits_gn.exp_().div_(logits_gn.sum(0, keepdim=True))

    def _theta(self, covariates_nc: torch.Tensor) -> torch.Tensor:
        if self.px_r is None:
            return torch.empty(0, device=covariates_nc.device)
        if self.px_r.dim() == 1:
            return torch.exp(self.px_r)
        return torch.exp(self.px_r.t()[covariates_nc[:, 0]])  # (n, g)

    def reconstruction_n(self, mb: Minibatch, gen: Generative) -> torch.Tensor:
        """-log p(x | z) per cell; the sparse path when non-zeros are given (same value)."""
        lik, x, mu = self.cfg.likelihood, mb.x_ng, gen.rate_ng
        if x is None and (mb.nz is None or lik == "zinb"):
            raise ValueError(
                f"the {lik} loss needs dense counts: build the minibatch with_counts=True"
            )
        if mb.nz is not None and lik == "nb":
            return -nb_log_prob_sum_sparse(mb.nz, mu, gen.theta)
        if mb.nz is not None and lik == "poisson":
            return -poisson_log_prob_sum_sparse(mb.nz, mu)
        if lik == "nb":
            return -log_nb_positive(x, mu, gen.theta).sum(-1)
        if lik == "zinb":
            return -log_zinb_positive(x, mu, gen.theta, gen.zi_logits_ng).sum(-1)
        return -log_poisson(x, mu).sum(-1)

    def loss(self, mb: Minibatch, kl_weight: float = 1.0, fused: bool = True) -> LossOutput:
        """``fused``: NB from logits in one autograd node (same value; ``False`` for reference)."""
        inf, z_prior = self._inference(mb, sample=True, with_prior=True)
        if fused and mb.nz is not None and self.cfg.likelihood == "nb":
            logits_ng, _ = self.decoder(inf.z_nk, mb.covariates_nc)
            theta = self._theta(mb.covariates_nc)
            rec_n = nb_nll_from_logits(logits_ng, inf.log_library_n1, theta, mb.nz)
        else:
            gen = self.generative(inf.z_nk, inf.log_library_n1, mb.covariates_nc)
            rec_n = self.reconstruction_n(mb, gen)
        kl_z_n = self.kl_z_n(inf, z_prior)
        kl_l_n = torch.zeros_like(kl_z_n)
        if inf.ql_mean_n1 is not None:
            batch_n = mb.covariates_nc[:, 0]
            prior = _normal(self.library_log_means[batch_n], self.library_log_vars[batch_n].sqrt())
            ql = _normal(inf.ql_mean_n1[:, 0], inf.ql_var_n1[:, 0].sqrt())
            kl_l_n = kl_divergence(ql, prior)
        # scvi-tools warms up only the z term; the library KL always has weight 1.
        loss = torch.mean(rec_n + kl_weight * kl_z_n + kl_l_n)
        return LossOutput(loss, rec_n, kl_z_n + kl_l_n)

    def forward(self, mb: Minibatch, kl_weight: float = 1.0) -> LossOutput:
        """The loss: what DistributedDataParallel calls, so gradients sync across workers."""
        return self.loss(mb, kl_weight)

    @torch.no_grad()
    def latent_mean(self, mb: Minibatch) -> torch.Tensor:
        """Mean of q(z|x): the embedding (``obsm["X_scvi"]``)."""
        return self.inference(mb, sample=False).qz_mean_nk

    @torch.no_grad()
    def normalized_expression(
        self, mb: Minibatch, library_size: float | None = None
    ) -> torch.Tensor:
        """Decoded gene scale at the posterior mean of z; times ``library_size`` if given."""
        inf = self.inference(mb, sample=False)
        scale = self.generative(inf.z_nk, inf.log_library_n1, mb.covariates_nc).scale_ng
        return scale * library_size if library_size is not None else scale


def new_vae(
    cfg: ModelConfig,
    seed: int,
    n_train: int,
    read_train: Callable[[np.ndarray], tuple[Any, np.ndarray]],
    train_blocks: Callable[[], Iterable[tuple[Any, np.ndarray]]],
) -> VAE:
    """A VAE ready to train: weights drawn from ``seed`` (every worker draws the same), the
    latent library's prior from the training cells (``train_blocks()``: (counts, batch codes)
    blocks), the VampPrior's pseudo-cells started at ``seed``-chosen training cells
    (``read_train(sorted positions)``: (counts, covariate codes))."""
    torch.manual_seed(seed)
    vae = VAE(cfg)
    if cfg.latent_library:
        vae.set_library_prior(train_blocks())
    if cfg.prior_components:
        k = cfg.prior_components
        if n_train < k:
            raise ValueError(
                f"a VampPrior of {k} pseudo-cells starts them at {k} training cells, but there "
                f"are {n_train}: lower --prior-components or train on more cells"
            )
        rows = np.sort(np.random.default_rng(seed).choice(n_train, k, replace=False))
        vae.set_pseudo_inputs(*read_train(rows))
    return vae


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_parameters_scvi_tools(cfg: ModelConfig) -> int:
    """Parameters of the same model as scvi-tools builds it (with its unused heads).

    scvi-tools also builds ``l_encoder`` (1 layer), ``px_r_decoder`` and ``px_dropout_decoder``
    whatever the likelihood; the Census figure (5.2 M + 256 per batch) counts them.
    """
    g, h, k = cfg.n_genes, cfg.n_hidden, cfg.n_latent
    cov = sum(cfg.covariate_sizes)
    enc_cov = cov if cfg.encode_covariates else 0
    fc = lambda n_in, n_layers, c: sum(  # noqa: E731
        (i_n + c) * h + h + 2 * h for i_n in [n_in] + [h] * (n_layers - 1)
    )
    z_enc = fc(g, cfg.n_layers, enc_cov) + 2 * (h * k + k)
    l_enc = fc(g, 1, enc_cov) + 2 * (h + 1)
    dec = fc(k, cfg.n_layers, cov) + 3 * (h * g + g)
    px_r = g if cfg.dispersion == "gene" else g * cfg.n_batches
    return z_enc + l_enc + dec + px_r
