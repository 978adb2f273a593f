"""Fully connected stacks with categorical covariates injected into every layer (scvi-tools' FCLayers).

scvi-tools concatenates a one-hot block to each layer's input. With ~7,400 Census batches that is a
(1024 x 7,400) by (7,400 x 128) product per layer for what is a row lookup, so here the one-hot
columns stay in the weight (same layout: covariate columns last, so weights copy across) but are
applied by indexing: ``W[:, n_in + offset + code]`` added to ``W[:, :n_in] @ h``. Same maths.

The encoder's first layer reads log1p counts, ~90 % zeros at Census density: on a CPU its input
comes as ``SparseRows`` (CSR and its transpose) and the product and weight gradient run on the
non-zeros (measured at 1,024 x 8,000, 6.8 % non-zero, one thread: 26 ms against 36 ms dense for
forward + weight gradient + building the input; dense wins above ~10 %, so denser minibatches
stay dense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SparseRows:
    """An (n, g) encoder input held sparse: CSR and the CSR of its transpose (for the weight
    gradient, g x n: torch's CSC products run ~10x slower than a CSR one)."""

    csr: torch.Tensor
    csr_t: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.csr.shape

    def to_dense(self) -> torch.Tensor:
        return self.csr.to_dense()


class _SparseInputLinear(torch.autograd.Function):
    """h @ W^T + b for a sparse ``h`` that needs no gradient: dW = (h^T @ dOut)^T, db = sum dOut."""

    @staticmethod
    def forward(ctx, csr, csr_t, weight, bias):  # noqa: D102
        ctx.save_for_backward(csr_t)
        return torch.addmm(bias, csr, weight.t())

    @staticmethod
    def backward(ctx, grad_no):  # noqa: D102
        (csr_t,) = ctx.saved_tensors
        d_weight = (csr_t @ grad_no).t() if ctx.needs_input_grad[2] else None
        d_bias = grad_no.sum(0) if ctx.needs_input_grad[3] else None
        return None, None, d_weight, d_bias


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

    def forward(
        self, h_ni: torch.Tensor | SparseRows, covariates_nc: torch.Tensor | None
    ) -> torch.Tensor:
        w = self.linear.weight
        if isinstance(h_ni, SparseRows):
            out_no = _SparseInputLinear.apply(
                h_ni.csr, h_ni.csr_t, w[:, : self.n_in], self.linear.bias
            )
        else:
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

    def forward(
        self, h: torch.Tensor | SparseRows, covariates_nc: torch.Tensor | None
    ) -> torch.Tensor:
        for linear, norm in zip(self.linears, self.norms):
            h = self.dropout(F.relu(norm(linear(h, covariates_nc))))
        return h
