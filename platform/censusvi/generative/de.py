"""scVI's Bayesian differential expression, as scvi-tools' ``differential_expression`` computes it.

Each group's normalised expression h is sampled from the posterior: cells drawn with replacement,
z ~ q(z | x), decoded under every reference batch (batch correction: the batch is marginalised)
or under each cell's own batch. Draws of the two groups are paired (within a batch when
marginalising) and, per gene:

- ``vanilla``: p = P(h1 > h2), Bayes factor log p - log(1 - p);
- ``change``: LFC = log2(h1 + c) - log2(h2 + c) with c the pseudocount scvi-tools estimates from
  genes without counts; proba_de = max(P(LFC >= delta), P(LFC < -delta)); the Bayes factor of
  proba_de; LFC mean/median/std/min/max (with c / 1000); genes called DE at a posterior FDR.

scvi-tools decodes n_samples / n_cells + 1 draws of every cell of a group under every batch and
then keeps n_samples of them; here only the drawn cells are encoded (once) and only the kept
draws are decoded: the same distribution for much less work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from censusvi import defaults
from censusvi.artifacts import DE_GENE, DE_GENE_ID
from censusvi.data.source import batch_labels
from censusvi.data.vocabulary import table_names
from censusvi.mapping.query import PreparedQuery, prepare_query
from censusvi.mapping.surgery import SurgeryConfig
from censusvi.model.io import TrainedModel
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.numeric import check_seed, is_finite, is_whole
from censusvi.progress import bar

log = logging.getLogger(__name__)
EPS = 1e-8
MODES = ("change", "vanilla")
MAX_SAMPLES = 100_000  # draws per group: beyond, memory (draws x genes floats) runs out first


@dataclass(frozen=True)
class DEConfig:
    mode: str = defaults.DE_MODE
    delta: float = defaults.DE_DELTA
    fdr: float = defaults.DE_FDR
    n_samples: int = defaults.DE_N_SAMPLES  # posterior draws per group
    batch_correction: bool = True  # decode under the reference batches and marginalise
    decode_batches: tuple[str, ...] | None = None  # None: every reference batch
    pseudocounts: float | None = None  # None: estimated as scvi-tools does
    threshold_counts: float = 0.01  # mean count below which a gene counts as unexpressed
    seed: int = defaults.DE_SEED
    batch_size: int = 2048  # draws decoded at once (bounds memory with the gene count)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {MODES}")
        if not (is_whole(self.n_samples) and 2 <= self.n_samples <= MAX_SAMPLES):
            raise ValueError(
                f"n_samples={self.n_samples}: from 2 to {MAX_SAMPLES:,} posterior draws per group "
                f"(scvi-tools' default {defaults.DE_N_SAMPLES:,})"
            )
        if not (is_finite(self.fdr) and 0 < self.fdr < 1):
            raise ValueError(f"fdr={self.fdr}: a target false discovery rate in (0, 1), e.g. 0.05")
        if not (is_finite(self.delta) and self.delta >= 0):
            raise ValueError(f"delta={self.delta}: a log fold-change threshold >= 0, e.g. 0.25")
        check_seed(self.seed)


@dataclass
class GroupCounts:
    """Raw count statistics of one group over the model's genes (scvi-tools' all_stats)."""

    mean: np.ndarray
    nonzero: np.ndarray
    normalized_mean: np.ndarray


UNGROUPED = "\x00ungrouped"  # the label of cells whose groupby value is missing (NaN)


def group_labels(column: pd.Series, groupby: str) -> np.ndarray:
    """Each cell's group as text; a missing value (NaN) is no group, not one called "nan":
    such cells are in neither side of a comparison, the rest included (a warning counts them)."""
    missing = column.isna().to_numpy()
    labels = column.astype(str).to_numpy(dtype=object)
    if missing.any():
        labels[missing] = UNGROUPED
        log.warning(
            "%d cells have no obs[%r] (NaN): they are left out of every group",
            missing.sum(),
            groupby,
        )
    return labels.astype(str)


@dataclass
class LabelSums:
    """Per-label sums over the cells with counts, from one pass: counts, non-zeros and
    1e4-normalised counts (labels, 3, genes). A comparison's two groups are a label and another
    label or the rest, so every comparison of a call is answered without reading cells again."""

    names: np.ndarray
    sums: np.ndarray
    n_cells: np.ndarray
    nonempty: np.ndarray  # (cells,) which cells have counts over the model's genes

    @classmethod
    def scan(cls, q: PreparedQuery, labels: np.ndarray) -> LabelSums:
        names, codes = np.unique(labels, return_inverse=True)
        sums = np.zeros((len(names), 3, len(q.model.genes)))
        nonempty = np.zeros(len(labels), dtype=bool)
        for pos, x, _ in q.cells.minibatches(4096, shuffle=False):
            nonempty[pos] = True
            onehot = sp.csr_matrix(
                (np.ones(len(pos)), (codes[pos], np.arange(len(pos)))), shape=(len(names), len(pos))
            )
            per_lib = sp.diags(1e4 / np.asarray(x.sum(1)).ravel())
            sums[:, 0] += (onehot @ x).toarray()
            sums[:, 1] += (onehot @ (x != 0).astype(np.float64)).toarray()
            sums[:, 2] += (onehot @ (per_lib @ x)).toarray()
        n_cells = np.bincount(codes[nonempty], minlength=len(names))
        return cls(names, sums, n_cells, nonempty)

    def group(self, label: str | None, rest_of: str | None = None) -> GroupCounts:
        """``label``'s statistics, or (``label`` None) those of every cell not ``rest_of``."""
        if label is not None:
            i = int(np.searchsorted(self.names, label))
            s, n = self.sums[i], self.n_cells[i]
        else:
            out = np.isin(self.names, [rest_of, UNGROUPED])  # the rest: labelled cells only
            s, n = self.sums[~out].sum(0), self.n_cells[~out].sum()
        return GroupCounts(*(s / max(int(n), 1)))


def _draw_scales(
    q: PreparedQuery,
    cells: np.ndarray,
    decode_codes: list[int | None],
    n_per_batch: int,
    rng: np.random.Generator,
    gen: torch.Generator,
    cfg: DEConfig,
    progress: tqdm,
) -> np.ndarray:
    """(genes, len(decode_codes) * n_per_batch) posterior draws of normalised expression: genes
    by draws, so that per-gene statistics reduce over contiguous memory."""
    vae = q.model.vae.eval()
    device = next(vae.parameters()).device
    n = len(decode_codes) * n_per_batch
    picks = rng.choice(cells, n, replace=True)  # draw b * n_per_batch + i decodes under code b
    unique, inverse = np.unique(picks, return_inverse=True)
    x, cov = q.cells.read(unique)
    out = torch.empty((len(q.model.genes), n), dtype=torch.float32)
    with torch.no_grad():
        inf = vae.inference(minibatch_from_csr(x, cov, device, with_nonzeros=False), sample=False)
        cov_t = torch.as_tensor(cov, device=device)
        for b, code in enumerate(decode_codes):
            cov_b = cov_t.clone()
            if code is not None:
                cov_b[:, 0] = code
            for start in range(b * n_per_batch, (b + 1) * n_per_batch, cfg.batch_size):
                stop = min(start + cfg.batch_size, (b + 1) * n_per_batch)
                idx = torch.as_tensor(inverse[start:stop], device=device)
                mean, var = inf.qz_mean_nk[idx], inf.qz_var_nk[idx]
                z = mean + var.sqrt() * torch.randn(mean.shape, generator=gen).to(device)
                out[:, start:stop].copy_(vae.scale_gn(z, cov_b[idx]))
                progress.update(len(idx))
    return out.numpy()


def estimate_pseudocounts(
    scales1: np.ndarray, scales2: np.ndarray, zero1: np.ndarray, zero2: np.ndarray
) -> float:
    """scvi-tools' offset: the 90th percentile of the largest scale among unexpressed genes,
    divided by the gene count (it shrinks LFCs of genes no cell expresses towards zero).
    ``scales*`` are genes x draws."""
    eps = []
    for scales, zero in ((scales1, zero1), (scales2, zero2)):
        eps.append(np.quantile(scales[zero].max(1), 0.9) if zero.any() else 1e-10)
    return float(max(1e-10, max(eps) / scales1.shape[0]))


def fdr_calls(proba_de: pd.Series, fdr: float) -> pd.Series:
    """Genes called DE so that the expected posterior FDR of the calls stays below ``fdr``."""
    ordered = proba_de.sort_values(ascending=False)
    cumulative = (1.0 - ordered).cumsum() / (1.0 + np.arange(len(ordered)))
    called = pd.Series(False, index=ordered.index)
    called.iloc[: int((cumulative <= fdr).sum())] = True
    return called.loc[proba_de.index]


def _median1(x: torch.Tensor) -> torch.Tensor:
    """numpy's median along axis 1 (the mean of the two middle values for an even count)."""
    n = x.shape[1]
    lo = torch.kthvalue(x, (n + 1) // 2, dim=1).values
    if n % 2:
        return lo
    # The next order statistic without a second selection: lo itself when it repeats past the
    # middle, else the smallest value above it.
    at_or_below = (x <= lo[:, None]).sum(1)
    above = torch.where(x > lo[:, None], x, torch.inf).amin(1)
    return (lo + torch.where(at_or_below > n // 2, lo, above)) / 2


def bayes_factor(p: np.ndarray) -> np.ndarray:
    """log p / (1 - p), with scvi-tools' epsilon so that certain calls stay finite."""
    return np.log(p + EPS) - np.log(1.0 - p + EPS)


GENE_BLOCK = 64  # genes processed together: their draws stay in cache through every statistic


def _lfc_statistics(t1: torch.Tensor, t2: torch.Tensor, pc: float, delta: float) -> dict:
    """proba_de and the LFC summaries for a block of genes (rows) x draws (columns)."""
    n = t1.shape[1]
    # LFC >= delta  <=>  (h1 + c) / (h2 + c) >= 2^delta: the decision needs no logarithm
    ratio = (t1 + pc).div_(t2 + pc)
    up = (ratio >= 2.0**delta).sum(1)
    down = (ratio < 2.0**-delta).sum(1)
    proba_de = torch.maximum(up, down) / n
    reported = torch.log2_((t1 + 1e-3 * pc).div_(t2 + 1e-3 * pc))
    mean = reported.mean(1)
    # Two cheap passes instead of torch.std's Welford recurrence (several times slower).
    std = torch.linalg.vector_norm(reported - mean[:, None], dim=1) / n**0.5
    lo, hi = torch.aminmax(reported, dim=1)
    return {
        "proba_de": proba_de.double(),
        "lfc_mean": mean,
        "lfc_median": _median1(reported),
        "lfc_std": std,
        "lfc_min": lo,
        "lfc_max": hi,
    }


def _compare(
    s1: np.ndarray, s2: np.ndarray, c1: GroupCounts, c2: GroupCounts, cfg: DEConfig
) -> dict:
    """Per-gene statistics of the paired draws (genes x draws, in cache-sized gene blocks)."""
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    scale1, scale2 = t1.mean(1).numpy(), t2.mean(1).numpy()
    if cfg.mode == "vanilla":
        p1 = (t1 > t2).sum(1).numpy() / t1.shape[1]
        res = {
            "proba_m1": p1,
            "proba_m2": 1.0 - p1,
            "bayes_factor": bayes_factor(p1),
            "scale1": scale1,
            "scale2": scale2,
        }
    else:
        pc = cfg.pseudocounts
        if pc is None:
            pc = estimate_pseudocounts(
                s1, s2, c1.mean < cfg.threshold_counts, c2.mean < cfg.threshold_counts
            )
        blocks = [
            _lfc_statistics(t1[i : i + GENE_BLOCK], t2[i : i + GENE_BLOCK], pc, cfg.delta)
            for i in range(0, t1.shape[0], GENE_BLOCK)
        ]
        stats = {k: torch.cat([b[k] for b in blocks]).numpy() for k in blocks[0]}
        proba_de = stats.pop("proba_de")
        res = {
            "proba_de": proba_de,
            "proba_not_de": 1.0 - proba_de,
            "bayes_factor": bayes_factor(proba_de),
            "scale1": scale1,
            "scale2": scale2,
            "pseudocounts": pc,
            "delta": cfg.delta,
            **stats,
        }
    return {
        **res,
        "raw_mean1": c1.mean,
        "raw_mean2": c2.mean,
        "non_zeros_proportion1": c1.nonzero,
        "non_zeros_proportion2": c2.nonzero,
        "raw_normalized_mean1": c1.normalized_mean,
        "raw_normalized_mean2": c2.normalized_mean,
    }


def _decode_codes(model: TrainedModel, q: PreparedQuery, cfg: DEConfig) -> list[int | None]:
    if not cfg.batch_correction:
        return [None]  # each draw decoded under its cell's own batch
    names = cfg.decode_batches or model.batch_categories  # the reference's batches
    lookup = {b: i for i, b in enumerate(q.model.batch_categories)}
    unknown = [b for b in names if b not in lookup]
    if unknown:
        raise ValueError(
            f"decode batch(es) {unknown[:3]} are not batches of the model (e.g. "
            f"{list(q.model.batch_categories[:3])})"
        )
    return [lookup[b] for b in names]


def top_genes(res: pd.DataFrame, n: int = 50) -> pd.DataFrame:
    """The ``n`` genes with the largest Bayes factor; many saturate (every draw beyond delta), so
    ties are broken by the size of the mean log-fold change."""
    ranked = res.assign(_abs_lfc=res["lfc_mean"].abs() if "lfc_mean" in res else 0.0)
    return (
        ranked.sort_values(["bayes_factor", "_abs_lfc"], ascending=False)
        .head(n)
        .drop(columns="_abs_lfc")
    )


def differential_expression(
    model: TrainedModel,
    adata: ad.AnnData,
    groupby: str,
    group1: str | list[str],
    group2: str | None = None,
    batch_key: str | None = None,
    config: DEConfig | None = None,
    layer: str | None = None,
    surgery: SurgeryConfig | None = None,
    quiet: bool = False,
) -> pd.DataFrame:
    """One row per model gene and comparison (``group1`` vs ``group2``, or vs the rest), sorted
    by proba_de (change) or Bayes factor (vanilla), indexed by gene symbol (the data's, else the
    model's; ``table_names``) with the gene id in column ``gene_id``. ``batch_key`` defaults to the model's own
    batch keys (reference data); a query with new batches is mapped first (surgery)."""
    cfg = config or DEConfig()
    if groupby not in adata.obs.columns:
        raise ValueError(
            f"groupby {groupby!r} is not an obs column; obs has {sorted(adata.obs.columns)}"
        )
    labels = group_labels(adata.obs[groupby], groupby)
    # each group once: --group1 B,B ran B vs rest twice (each gene twice in the table)
    groups1 = list(dict.fromkeys([group1] if isinstance(group1, str) else group1))
    if not groups1 or "" in groups1:
        raise ValueError(f"group1 {group1!r}: name a group of obs[{groupby!r}] (or A,B,...)")
    if group2 is not None and group2 in groups1:
        raise ValueError(f"group {group2!r} is both group1 and group2: compare two groups")
    named = sorted(str(v) for v in set(labels) - {UNGROUPED})
    for g in [*groups1, *([group2] if group2 is not None else [])]:
        if g not in named:
            raise ValueError(f"group {g!r} is not in obs[{groupby!r}]; it has {named[:20]}")
    if batch_key is None:
        adata = ad.AnnData(adata.X, obs=adata.obs.copy(), var=adata.var, layers=dict(adata.layers))
        adata.obs["_censusvi_batch"] = batch_labels(adata.obs, model.batch_keys, "data")
        batch_key = "_censusvi_batch"
    q = prepare_query(model, adata, batch_key, layer, surgery)
    label_sums = LabelSums.scan(q, labels)
    nonempty = label_sums.nonempty
    codes = _decode_codes(model, q, cfg)
    symbols, ids = table_names(model.genes, q.alignment, q.cells.source.var_keys)
    n_per_batch = max(int(cfg.n_samples / len(codes)), 2)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    frames = []
    total = 2 * len(groups1) * len(codes) * n_per_batch
    with bar(total=total, desc="DE draws", unit="draw", quiet=quiet) as progress:
        for g1 in groups1:
            m1 = (labels == g1) & nonempty
            rest = (labels != g1) & (labels != UNGROUPED)
            m2 = ((labels == group2) if group2 is not None else rest) & nonempty
            for name, m in ((g1, m1), (group2 or "the rest", m2)):
                if not m.any():
                    raise ValueError(
                        f"{g1} vs {group2 or 'rest'}: {name} has no cells with counts"
                        + ("" if group2 or rest.any() else f"; every labelled cell is {g1!r}")
                    )
            c1, c2 = label_sums.group(g1), label_sums.group(group2, rest_of=g1)
            s1 = _draw_scales(q, np.flatnonzero(m1), codes, n_per_batch, rng, gen, cfg, progress)
            s2 = _draw_scales(q, np.flatnonzero(m2), codes, n_per_batch, rng, gen, cfg, progress)
            res = pd.DataFrame(_compare(s1, s2, c1, c2, cfg), index=pd.Index(symbols, name=DE_GENE))
            res.insert(0, DE_GENE_ID, ids)
            res = res.sort_values(
                "proba_de" if cfg.mode == "change" else "bayes_factor", ascending=False
            )
            if cfg.mode == "change":
                res[f"is_de_fdr_{cfg.fdr}"] = fdr_calls(res["proba_de"], cfg.fdr)
            g2 = "Rest" if group2 is None else group2
            res["comparison"], res["group1"], res["group2"] = f"{g1} vs {g2}", g1, g2
            res["n_cells1"], res["n_cells2"] = int(m1.sum()), int(m2.sum())
            frames.append(res)
    return pd.concat(frames)
