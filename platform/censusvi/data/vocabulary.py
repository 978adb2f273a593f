"""The ordered gene vocabulary a model carries, and aligning a dataset's genes to it.

Genes are matched by Ensembl id (Census ``var.feature_id``); symbols are only a fallback for genes
whose id is missing, and every fallback is reported. Model genes absent from the data are filled
with zero counts. Imports numpy only, so the model core stays usable where pandas is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_OVERLAP = 0.5


def check_unique_gene_ids(ids: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming a few gene ids that occur more than once, and the fix.

    Genes are matched by id, which cannot choose between two columns of one gene (the last
    would silently win), so a repeat is refused. Empty ids (genes known only by symbol) are
    not compared. One check for every reader of gene ids: files, the client, the server.
    """
    seen: dict[str, int] = {}
    for i in ids:
        if i:
            seen[i] = seen.get(i, 0) + 1
    repeated = [(i, c) for i, c in seen.items() if c > 1]
    if repeated:
        eg = ", ".join(f"{i} ({c} columns)" for i, c in repeated[:3])
        raise ValueError(
            f"{where}: gene ids must be unique, but {len(repeated)} repeat, e.g. {eg}. Sum the "
            "repeated columns into one (or drop all but one) first: var_names_make_unique() "
            "only renames a copy, which then matches no gene"
        )


def _looks_like_ensembl(ids: Sequence[str]) -> bool:
    sample = [i for i in ids[:200] if i]
    return bool(sample) and sum(i.startswith("ENS") for i in sample) > len(sample) / 2


@dataclass(frozen=True)
class GeneAlignment:
    """Where each model gene is found in a dataset, and a report of the overlap."""

    data_index: np.ndarray  # (n_model_genes,) column of the dataset for each model gene, -1 absent
    n_model_genes: int
    n_matched_by_id: int
    n_matched_by_symbol: int
    n_data_genes: int

    @property
    def n_matched(self) -> int:
        return self.n_matched_by_id + self.n_matched_by_symbol

    @property
    def overlap(self) -> float:
        return self.n_matched / self.n_model_genes

    def report(self) -> dict[str, int | float]:
        return {
            "model_genes": self.n_model_genes,
            "matched": self.n_matched,
            "matched_by_id": self.n_matched_by_id,
            "matched_by_symbol": self.n_matched_by_symbol,
            "missing": self.n_model_genes - self.n_matched,
            "extra": self.n_data_genes - self.n_matched,
            "overlap": round(self.overlap, 4),
        }


@dataclass(frozen=True)
class GeneVocabulary:
    """Ordered Ensembl ids (and symbols, same order) that define a model's gene axis."""

    ids: tuple[str, ...]
    symbols: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        syms = tuple(str(s) for s in self.symbols) if self.symbols else self.ids
        if len(syms) != len(self.ids):
            raise ValueError(f"{len(self.ids)} gene ids but {len(syms)} symbols; give one per id")
        object.__setattr__(self, "symbols", syms)
        check_unique_gene_ids(self.ids, "the genes")

    def __len__(self) -> int:
        return len(self.ids)

    def align(
        self,
        data_ids: Sequence[str | None],
        data_symbols: Sequence[str | None] | None = None,
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        where: str = "the data",
    ) -> GeneAlignment:
        """Match the dataset's genes to this vocabulary; raise if ids repeat or too few match."""
        if not 0 <= min_overlap <= 1:  # NaN too: every overlap passed a NaN or negative bound
            raise ValueError(
                f"minimum gene overlap {min_overlap}: it is a fraction of the model's genes, "
                "between 0 and 1 (default 0.5)"
            )
        data_ids = [
            str(i) if i is not None and str(i) not in ("", "nan", "None") else "" for i in data_ids
        ]
        check_unique_gene_ids(data_ids, where)
        by_id = {gid: j for j, gid in enumerate(data_ids) if gid}
        by_sym: dict[str, int] = {}
        if data_symbols is not None:
            for j, s in enumerate(data_symbols):
                if s is not None and not data_ids[j]:
                    by_sym.setdefault(str(s), j)
        index = np.full(len(self.ids), -1, dtype=np.int64)
        n_id = n_sym = 0
        for m, (gid, sym) in enumerate(zip(self.ids, self.symbols)):
            if gid in by_id:
                index[m], n_id = by_id[gid], n_id + 1
            elif sym in by_sym:
                index[m], n_sym = by_sym[sym], n_sym + 1
        al = GeneAlignment(index, len(self.ids), n_id, n_sym, len(data_ids))
        if al.overlap < min_overlap:
            expected = (
                "Ensembl ids (e.g. ENSG00000141510)"
                if _looks_like_ensembl(self.ids)
                else "gene ids"
            )
            found = [i for i in data_ids[:3] if i] or [str(s) for s in (data_symbols or [])[:3]]
            raise ValueError(
                f"only {al.n_matched} of the model's {len(self.ids)} genes "
                f"({al.overlap:.1%}) are in the data; at least {min_overlap:.0%} are needed. "
                f"The model expects {expected}; the data's gene ids look like {found}. "
                "Put Ensembl ids in var['gene_ids'] (or var['feature_id']) or var_names."
            )
        return al

    def to_dict(self) -> dict[str, list[str]]:
        return {"ids": list(self.ids), "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, d: dict[str, list[str]]) -> GeneVocabulary:
        return cls(tuple(d["ids"]), tuple(d.get("symbols") or ()))
