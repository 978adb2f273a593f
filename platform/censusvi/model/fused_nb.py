"""scVI's NB reconstruction loss from decoder logits, fused into one autograd node for CPU speed.

-sum_g log NB(x_ng; mu = exp(log_lib) * softmax(logits), theta) per cell: the same value as
``-log_nb_positive(x, rate, theta).sum(-1)`` (``likelihoods.py``) with ``rate`` from the decoder,
and a hand-written backward. Where the time goes on a CPU, in numbers (1,024 cells x 8,000 genes,
one thread): a full (n, g) elementwise op streams 33 MB and a transcendental one costs ~8 ms;
autograd over the unfused ops makes ~20 such passes and allocates ~10 fresh (n, g) tensors per step
(each ~8,000 page faults). Here:
- log-gamma terms and their digamma gradients only at non-zeros (x = 0 contributes exactly 0);
- the dense terms on blocks of rows (``row_block``) that stay in cache, in reused buffers;
- two transcendental passes forward (exp, log) and two backward (exp, divide), with mu recomputed
  from the logits instead of kept: no (n, g) tensor allocated but the gradient itself;
- the per-gene dispersion's gradient needs sum_n grad_n log(theta + mu): the forward keeps the
  column sums of log(theta + mu) and, when every cell's grad is equal (a mean loss), the backward
  uses them instead of another log pass.

Gradients: dNLL/dmu = theta / (theta + mu) everywhere, plus x / (theta + mu) - x / mu at non-zeros;
through the softmax, d logits = U - s * sum_g U with U = dNLL/dmu * mu.
"""

from __future__ import annotations

import torch

from censusvi.model.likelihoods import EPS, NonZeros, full_precision

ROW_BLOCK_BYTES = 1 << 20  # CPU: (rows x genes) float32 blocks of ~1 MiB stay in cache between ops


def row_block(n_cells: int, n_genes: int, device: torch.device) -> int:
    """Rows per block of the dense terms: ~1 MiB per CPU thread (each op splits its block across
    torch's threads); one block on a GPU, where each block costs kernel launches and the step is
    bound by host work, not memory."""
    if device.type != "cpu":
        return n_cells
    per_block = ROW_BLOCK_BYTES * torch.get_num_threads()
    return max(1, min(n_cells, per_block // (4 * max(n_genes, 1))))


def _dense_forward(logits_ng, log_lib_n1, theta, flat, starts):
    """Per cell: sum_g theta log(theta + mu + eps) (theta's own term added by the caller), the
    log-sum-exp of the logits, per gene the column sums of log(theta + mu + eps), and the logits
    at the non-zeros (gathered while their block is in cache)."""
    n, g = logits_ng.shape
    logit_e = logits_ng.new_empty(flat.shape)
    per_gene = theta.dim() == 1
    lse_n1 = torch.empty_like(log_lib_n1)
    dense_n = torch.empty(n, dtype=logits_ng.dtype, device=logits_ng.device)
    col_log_tpm_g = torch.zeros(g, dtype=logits_ng.dtype, device=logits_ng.device)
    step = row_block(n, g, logits_ng.device)
    buf = logits_ng.new_empty((min(step, n), g))
    for a in range(0, n, step):
        b = min(a + step, n)
        t, th = buf[: b - a], theta if per_gene else theta[a:b]
        lo, hi = int(starts[a]), int(starts[b])
        torch.index_select(logits_ng[a:b].reshape(-1), 0, flat[lo:hi] - a * g, out=logit_e[lo:hi])
        m_b1 = logits_ng[a:b].amax(-1, keepdim=True)
        torch.sub(logits_ng[a:b], m_b1, out=t).exp_()
        log_s_b1 = torch.log(t.sum(-1, keepdim=True))
        lse_n1[a:b] = m_b1 + log_s_b1
        t.mul_(torch.exp(log_lib_n1[a:b] - log_s_b1))  # mu = exp(logits - m) * lib / sum
        t.add_(th + EPS).log_()  # log(theta + mu + eps)
        if per_gene:
            torch.mv(t, theta, out=dense_n[a:b])
            col_log_tpm_g += t.sum(0)
        else:
            dense_n[a:b] = (th * t).sum(-1)
    return dense_n, lse_n1, col_log_tpm_g, logit_e


def _dense_backward(logits_ng, log_lib_n1, lse_n1, theta, grad_n, u_e, flat, starts, want):
    """d logits (or None), d log_lib and the dense part of d theta (sum over cells of
    grad * (log tpm + theta / tpm) for per-gene theta, only its theta / tpm part when
    ``want["log_tpm"]`` is False). ``u_e``: U at the non-zeros on top of the dense part."""
    n, g = logits_ng.shape
    per_gene = theta.dim() == 1
    d_logits = torch.empty_like(logits_ng) if want["logits"] else None
    d_lib = torch.empty_like(log_lib_n1)
    d_theta = torch.zeros_like(theta) if want["theta"] else None
    step = row_block(n, g, logits_ng.device)
    mu, u = logits_ng.new_empty((min(step, n), g)), logits_ng.new_empty((min(step, n), g))
    for a in range(0, n, step):
        b = min(a + step, n)
        m, t, g_b1 = mu[: b - a], u[: b - a], grad_n[a:b, None]
        th = theta if per_gene else theta[a:b]
        torch.sub(logits_ng[a:b], lse_n1[a:b] - log_lib_n1[a:b], out=m).exp_()  # mu
        torch.add(m, th + EPS, out=t)  # tpm
        if want["theta"] and want["log_tpm"]:
            log_t = torch.log(t)
            if per_gene:
                d_theta += g_b1[:, 0] @ log_t
            else:
                d_theta[a:b] = log_t * g_b1
        torch.div(th, t, out=t)  # theta / tpm
        if want["theta"]:
            if per_gene:
                d_theta += g_b1[:, 0] @ t
            else:
                d_theta[a:b] += t * g_b1
        t.mul_(m).mul_(g_b1)  # U = dNLL/dmu * mu, dense part
        lo, hi = int(starts[a]), int(starts[b])
        t.view(-1).index_add_(0, flat[lo:hi] - a * g, u_e[lo:hi])
        u_b1 = t.sum(-1, keepdim=True)
        d_lib[a:b] = u_b1
        if d_logits is not None:  # U - s * sum_g U, s = mu * exp(-log_lib)
            torch.addcmul(t, m, -torch.exp(-log_lib_n1[a:b]) * u_b1, out=d_logits[a:b])
    return d_logits, d_lib, d_theta


class _NBNllFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_ng, log_lib_n1, theta, row, col, x):  # noqa: D102
        n, g = logits_ng.shape
        per_gene = theta.dim() == 1
        flat = row * g + col  # non-zeros' positions in the flattened (n, g) tensors
        starts = torch.searchsorted(row, torch.arange(n + 1, device=row.device))  # CSR indptr
        dense_n, lse_n1, col_log_tpm_g, logit_e = _dense_forward(
            logits_ng, log_lib_n1, theta, flat, starts
        )
        log_theta_eps = torch.log(theta + EPS)
        if per_gene:  # index_select: several times faster than advanced indexing on a CPU
            dense_n -= (theta * log_theta_eps).sum()
            th_e = theta.index_select(0, col)
            lg_theta_e = torch.lgamma(theta).index_select(0, col)
        else:
            dense_n -= (theta * log_theta_eps).sum(-1)
            th_e = theta.reshape(-1).index_select(0, flat)
            lg_theta_e = torch.lgamma(th_e)
        mu_e = torch.exp(logit_e - (lse_n1 - log_lib_n1)[:, 0].index_select(0, row))
        tpm_e = mu_e + (th_e + EPS)
        sparse_e = (
            x * (torch.log(mu_e + EPS) - torch.log(tpm_e))
            + torch.lgamma(x + th_e)
            - lg_theta_e
            - torch.lgamma(x + 1)
        )
        ctx.save_for_backward(
            logits_ng, log_lib_n1, lse_n1, theta, row, col, flat, starts, x, mu_e, tpm_e, th_e
        )
        ctx.col_log_tpm_g = col_log_tpm_g
        return dense_n.index_add_(0, row, sparse_e, alpha=-1)

    @staticmethod
    def backward(ctx, grad_n):  # noqa: D102
        logits_ng, log_lib_n1, lse_n1, theta, row, col, flat, starts, x, mu_e, tpm_e, th_e = (
            ctx.saved_tensors
        )
        per_gene = theta.dim() == 1
        want_theta = ctx.needs_input_grad[2]
        # a mean loss gives every cell the same grad: sum_n grad log tpm = grad * column sums
        uniform = per_gene and want_theta and bool((grad_n == grad_n[0]).all())
        want = {"logits": ctx.needs_input_grad[0], "theta": want_theta, "log_tpm": not uniform}
        g_e = grad_n.index_select(0, row)
        u_e = g_e * (x / tpm_e - x / (mu_e + EPS)) * mu_e
        d_logits, d_lib, d_theta = _dense_backward(
            logits_ng, log_lib_n1, lse_n1, theta, grad_n, u_e, flat, starts, want
        )
        if want_theta:
            # dense: - grad * (log(theta + eps) + theta / (theta + eps)); sparse at non-zeros:
            # grad * (x / tpm - digamma(x + theta) + digamma(theta))
            const = torch.log(theta + EPS) + theta / (theta + EPS)
            dig_e = x / tpm_e - torch.digamma(x + th_e)
            if per_gene:
                if uniform:
                    d_theta += grad_n[0] * ctx.col_log_tpm_g
                d_theta -= grad_n.sum() * const
                dig_e += torch.digamma(theta).index_select(0, col)
                d_theta.index_add_(0, col, g_e * dig_e)
            else:
                d_theta -= const * grad_n[:, None]
                dig_e += torch.digamma(th_e)
                d_theta.view(-1).index_add_(0, flat, g_e * dig_e)
        return d_logits, d_lib if ctx.needs_input_grad[1] else None, d_theta, None, None, None


def nb_nll_from_logits(
    logits_ng: torch.Tensor, log_lib_n1: torch.Tensor, theta: torch.Tensor, nz: NonZeros
) -> torch.Tensor:
    """Per-cell NB negative log-likelihood from decoder logits (see the module's docstring).
    Always fp32: under bf16 autocast its matrix products would otherwise round the likelihood."""
    with torch.autocast(logits_ng.device.type, enabled=False):
        return _NBNllFromLogits.apply(
            full_precision(logits_ng), log_lib_n1, theta, nz.row, nz.col, nz.value
        )
