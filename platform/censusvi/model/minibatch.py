"""A minibatch as the model consumes it, built from a CSR block of counts.

Counts stay CSR (scipy) through reading, gene selection and shuffling; only here do they become
tensors: ``h_ng = log1p(x)`` for the encoder (on a CPU sparse ``SparseRows`` below
``SPARSE_INPUT_DENSITY`` non-zeros, where its product is cheaper than a dense one; dense above it
and on a GPU), the log library size, and the non-zero list the sparse likelihood needs. Dense
raw counts are built only for likelihoods evaluated densely (ZINB, the reference path). On a GPU
the CSR arrays are moved and densified on the device: ~10x fewer bytes than a dense host tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from censusvi.model.layers import SparseRows
from censusvi.model.likelihoods import NonZeros

SPARSE_INPUT_DENSITY = 0.1  # CPU: sparse encoder input below this share of non-zeros


@dataclass(frozen=True)
class Minibatch:
    """n cells: encoder input, log library, covariate codes; non-zeros and/or dense counts.

    ``covariates_nc[:, 0]`` is the batch code; further columns are extra categorical covariates.
    """

    h_ng: torch.Tensor | SparseRows  # log1p(counts)
    log_library_n1: torch.Tensor  # log of total counts per cell (observed library size)
    covariates_nc: torch.Tensor
    nz: NonZeros | None = None
    x_ng: torch.Tensor | None = None  # dense raw counts, only when a dense likelihood needs them

    @property
    def n_cells(self) -> int:
        return self.h_ng.shape[0]

    @classmethod
    def from_dense(cls, x_ng: torch.Tensor, covariates_nc: torch.Tensor) -> Minibatch:
        """From dense counts (tests, small inputs): no non-zero list, dense likelihood path."""
        return cls(
            torch.log1p(x_ng), torch.log(x_ng.sum(1, keepdim=True)), covariates_nc, None, x_ng
        )


def _sparse_csr(indptr, col, val, shape, device: torch.device | None = None) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            indptr, col, val, size=shape, device=device, check_invariants=False
        )


def _dense(indptr, col, val, shape, device: torch.device) -> torch.Tensor:
    return _sparse_csr(indptr, col, val, shape, device).to_dense()


def _csr_tensor(x: sp.csr_matrix) -> torch.Tensor:
    return _sparse_csr(
        torch.from_numpy(x.indptr.astype(np.int64)),
        torch.from_numpy(x.indices.astype(np.int64)),
        torch.from_numpy(x.data),
        x.shape,
    )


def minibatch_from_csr(
    x: sp.csr_matrix,
    covariates_nc: np.ndarray,
    device: torch.device | str = "cpu",
    with_nonzeros: bool = True,
    with_counts: bool = False,
) -> Minibatch:
    """Tensors for one minibatch; ``covariates_nc`` is an (n, c) integer array of codes.

    On a GPU only the raw CSR arrays cross the bus; log1p, library sizes, row indices and the
    densification run on the device (host-side numpy work would otherwise bound throughput).
    """
    device = torch.device(device)
    n = x.shape[0]
    cov = torch.from_numpy(np.asarray(covariates_nc, dtype=np.int64).reshape(n, -1)).to(device)
    val = torch.from_numpy(x.data.astype(np.float32, copy=False)).to(device, non_blocking=True)
    if device.type == "cpu":
        h = sp.csr_matrix((np.log1p(val.numpy()), x.indices, x.indptr), shape=x.shape)
        sparse = x.nnz < SPARSE_INPUT_DENSITY * n * x.shape[1]
        h_ng = (
            SparseRows(_csr_tensor(h), _csr_tensor(h.T.tocsr()))
            if sparse
            else torch.from_numpy(h.toarray())
        )
        x_ng = torch.from_numpy(x.toarray()) if with_counts else None
        col = torch.from_numpy(x.indices.astype(np.int64))
        row = torch.from_numpy(np.repeat(np.arange(n, dtype=np.int64), np.diff(x.indptr)))
    else:
        indptr = torch.from_numpy(x.indptr).to(device, non_blocking=True).long()
        col = torch.from_numpy(x.indices).to(device, non_blocking=True).long()
        h_ng = _dense(indptr, col, torch.log1p(val), x.shape, device)
        x_ng = _dense(indptr, col, val, x.shape, device) if with_counts else None
        row = torch.repeat_interleave(
            torch.arange(n, device=device), indptr[1:] - indptr[:-1], output_size=x.nnz
        )
    library = torch.zeros(n, device=device).index_add_(0, row, val)
    log_lib = torch.log(library).unsqueeze(1)
    nz = NonZeros(row=row, col=col, value=val) if with_nonzeros else None
    return Minibatch(h_ng, log_lib, cov, nz, x_ng)


class DeviceCSR:
    """A CSR count matrix held on the device, cut into minibatches there.

    For a GPU with the data in memory (the Census model was trained so): rows are gathered with
    a handful of device kernels, and the only host work per step is a sum over row lengths (to
    size the gather without a device sync). Host-to-device copies of pageable memory block the
    host, so without this the GPU idles while the host slices and copies every minibatch.
    """

    def __init__(
        self, x: sp.csr_matrix, covariates_nc: np.ndarray, device: torch.device | str
    ) -> None:
        self.device = torch.device(device)
        self.n_genes = x.shape[1]
        self.row_nnz = np.diff(x.indptr)  # host copy: sizes each gather without a sync
        self.indptr = torch.from_numpy(x.indptr.astype(np.int64)).to(self.device)
        self.indices = torch.from_numpy(x.indices.astype(np.int64)).to(self.device)
        self.data = torch.from_numpy(x.data.astype(np.float32)).to(self.device)
        cov = np.asarray(covariates_nc, dtype=np.int64).reshape(x.shape[0], -1)
        self.covariates_nc = torch.from_numpy(cov).to(self.device)

    def __len__(self) -> int:
        return len(self.row_nnz)

    def minibatch(
        self,
        rows: np.ndarray,
        rows_device: torch.Tensor,
        with_nonzeros: bool = True,
        with_counts: bool = False,
    ) -> Minibatch:
        """Cells ``rows`` (host copy for sizes, device copy for the gather) as a minibatch."""
        n, nnz = len(rows), int(self.row_nnz[rows].sum())
        start = self.indptr[rows_device]
        counts = self.indptr[rows_device + 1] - start
        row = torch.repeat_interleave(torch.arange(n, device=self.device), counts, output_size=nnz)
        new_indptr = torch.zeros(n + 1, dtype=torch.long, device=self.device)
        new_indptr[1:] = torch.cumsum(counts, 0)
        pos = torch.arange(nnz, device=self.device) - new_indptr[row] + start[row]
        col, val = self.indices[pos], self.data[pos]
        shape = (n, self.n_genes)
        h_ng = _dense(new_indptr, col, torch.log1p(val), shape, self.device)
        x_ng = _dense(new_indptr, col, val, shape, self.device) if with_counts else None
        log_lib = torch.log(torch.zeros(n, device=self.device).index_add_(0, row, val)).unsqueeze(1)
        nz = NonZeros(row=row, col=col, value=val) if with_nonzeros else None
        return Minibatch(h_ng, log_lib, self.covariates_nc[rows_device], nz, x_ng)

    def minibatches(
        self, batch_size: int, shuffle: bool, seed: int, **kwargs
    ) -> Iterator[Minibatch]:
        order = (
            np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        )
        order_device = torch.from_numpy(order).to(self.device)
        for s in range(0, len(order), batch_size):
            if len(order) - s >= 3 or not shuffle:  # batch norm needs >1 cell
                yield self.minibatch(
                    order[s : s + batch_size], order_device[s : s + batch_size], **kwargs
                )
