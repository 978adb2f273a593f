"""Fully connected stacks with categorical covariates injected into every layer (scvi-tools' FCLayers).

scvi-tools concatenates a one-hot block to each layer's input. With ~7,400 Census batches that is a
(1024 x 7,400) by (7,400 x 128) product per layer for what is a row lookup, so here the one-hot
columns stay in the weight (same layout: covariate columns last, so weights copy across) but are
applied by indexing: ``W[:, n_in + offset + code]`` added to ``W[:, :n_in] @ h``. Same maths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class InjectedLinear(nn.Module):
    """Linear layer on ``[h, one_hot(c_1), ..., one_hot(c_k)]`` computed without the one-hots."""

    def __init__(self, n_in: int, n_out: int, covariate_sizes: Sequence[int]) -> None:
        super().__init__()
        self.n_in = n_in
        self.linear = nn.Linear(n_in + sum(covariate_sizes), n_out)
        offsets = torch.tensor([0, *covariate_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer(
            "offsets", offsets if covariate_sizes else offsets[:0], persistent=False
        )

    def forward(self, h_ni: torch.Tensor, covariates_nc: torch.Tensor | None) -> torch.Tensor:
        w = self.linear.weight
        out_no = F.linear(h_ni, w[:, : self.n_in], self.linear.bias)
        if self.offsets.numel():
            cols_nc = covariates_nc + self.offsets  # column of each covariate's one-hot 1
            w_cov_co = w[:, self.n_in :].t()  # (sum of levels, n_out)
            out_no = out_no + w_cov_co[cols_nc].sum(1)
        return out_no


class FCLayers(nn.Module):
    """``n_layers`` x (injected linear -> batch norm -> ReLU -> dropout), scvi-tools' defaults.

    Batch norm uses momentum 0.01 and eps 1e-3, scvi-tools' values, so running statistics and
    outputs match a model trained there.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_layers: int,
        covariate_sizes: Sequence[int] = (),
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        sizes = [n_in] + [n_hidden] * n_layers
        self.linears = nn.ModuleList(
            InjectedLinear(a, b, covariate_sizes) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(b, momentum=0.01, eps=1e-3) for b in sizes[1:])
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, covariates_nc: torch.Tensor | None) -> torch.Tensor:
        for linear, norm in zip(self.linears, self.norms):
            h = self.dropout(F.relu(norm(linear(h, covariates_nc))))
        return h
