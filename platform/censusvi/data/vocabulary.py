"""The ordered gene vocabulary a model carries, and aligning a dataset's genes to it.

A gene can be named two ways: an id (Ensembl, Census ``var.feature_id``) or a symbol (Census
``var.feature_name``). A model knows its genes by id and, where known, by symbol; a dataset offers
its var_names and any id or symbol columns (``ID_COLUMNS``, ``SYMBOL_COLUMNS``). Alignment tries
every pairing of a model key with a data key, keeps the one that matches the most genes and says
which. Model genes absent from the data are filled with zero counts. Imports numpy only, so the
model core stays usable where pandas is absent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MIN_OVERLAP = 0.5
# var columns that hold gene ids / gene symbols, in the order they are preferred (Census names
# first, then what scanpy, Cell Ranger and scvi-tools write).
ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol")
VAR_NAMES = "var_names"
MODEL_IDS, MODEL_SYMBOLS = "model ids", "model symbols"


def var_column_key(column: str) -> str:
    """How a data key from a var column is named in reports and errors."""
    return f"var[{column!r}]"


def check_unique_gene_ids(ids: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming a few gene ids that occur more than once, and the fix.

    Genes are matched by name, which cannot choose between two columns of one gene (the last
    would silently win), so a repeat is refused. Empty names (genes this key does not name) are
    not compared. One check for every reader of gene names: files, the client, the server.
    """
    if len(set(ids)) == len(ids):  # the common case, ~10x faster than counting
        return
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


def looks_like_ensembl(ids: Sequence[str]) -> bool:
    sample = [i for i in ids[:200] if i]
    return bool(sample) and sum(i.startswith("ENS") for i in sample) > len(sample) / 2


def _clean(names: Sequence[object]) -> list[str]:
    return [str(i) if i is not None and str(i) not in ("", "nan", "None") else "" for i in names]


@dataclass(frozen=True)
class GeneAlignment:
    """Where each model gene is found in a dataset, which keys paired, and the overlap."""

    data_index: np.ndarray  # (n_model_genes,) column of the dataset for each model gene, -1 absent
    n_model_genes: int
    n_data_genes: int
    key: tuple[str, str] = (MODEL_IDS, VAR_NAMES)  # (model key, data key) that matched best
    tried: dict[str, int] = field(default_factory=dict)  # "model key ~ data key" -> genes matched

    @property
    def n_matched(self) -> int:
        return int((self.data_index >= 0).sum())

    @property
    def overlap(self) -> float:
        return self.n_matched / self.n_model_genes

    @property
    def matched_by(self) -> str:
        return f"{self.key[0]} ~ {self.key[1]}"

    def report(self) -> dict[str, object]:
        return {
            "model_genes": self.n_model_genes,
            "matched": self.n_matched,
            "matched_by": self.matched_by,
            "keys_tried": dict(self.tried),
            "missing": self.n_model_genes - self.n_matched,
            "extra": self.n_data_genes - self.n_matched,
            "overlap": round(self.overlap, 4),
        }


def _match(model_names: Sequence[str], data_names: list[str]) -> np.ndarray:
    """Data column of each model gene by equal name; a name the model repeats matches once."""
    by_name: dict[str, int] = {}
    for j, g in enumerate(data_names):
        if g:
            by_name.setdefault(g, j)
    index = np.full(len(model_names), -1, dtype=np.int64)
    seen: set[str] = set()
    for m, g in enumerate(model_names):
        if g in by_name and g not in seen:
            index[m] = by_name[g]
            seen.add(g)
    return index


def _first_key(keys: Mapping[str, list[str]], columns: tuple[str, ...], ensembl: bool):
    """The data's names of one kind: the first such var column, else var_names if they are of
    that kind (Ensembl-like for ids, not for symbols), else None."""
    for c in columns:
        if var_column_key(c) in keys:
            return keys[var_column_key(c)]
    names = keys.get(VAR_NAMES)
    return names if names is not None and looks_like_ensembl(names) == ensembl else None


def table_names(
    vocab: GeneVocabulary, alignment: GeneAlignment, data_keys: Mapping[str, Sequence]
) -> tuple[list[str], list[str]]:
    """(symbol, id) of every model gene for result tables: the symbol the data uses for it (the
    model's where the data lacks the gene or symbols), and the model's id, or the data's where the
    model knows its genes by symbol only (an scvi-tools model trained on symbols)."""
    data = {k: _clean(v) for k, v in data_keys.items()}
    d_sym = _first_key(data, SYMBOL_COLUMNS, ensembl=False)
    d_ids = _first_key(data, ID_COLUMNS, ensembl=True)
    symbols, ids = list(vocab.symbols), list(vocab.ids)
    for m, j in enumerate(alignment.data_index):
        if j < 0:
            continue
        if d_sym is not None and d_sym[j]:
            symbols[m] = d_sym[j]
        if not vocab.has_ids and d_ids is not None and d_ids[j]:
            ids[m] = d_ids[j]
    return symbols, ids


@dataclass(frozen=True)
class GeneVocabulary:
    """Ordered gene ids (and symbols, same order; the ids where none are known) that define a
    model's gene axis."""

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

    @property
    def has_ids(self) -> bool:
        """Whether the model knows its genes by id: symbols beside them, or Ensembl-like. A model
        trained on symbol var_names alone (common for scvi-tools) knows them by symbol only."""
        return self.symbols != self.ids or looks_like_ensembl(self.ids)

    def keys(self) -> dict[str, tuple[str, ...]]:
        """The model's names for its genes: ids and symbols, or the one it has."""
        if self.symbols == self.ids:
            return {MODEL_IDS if self.has_ids else MODEL_SYMBOLS: self.ids}
        return {MODEL_IDS: self.ids, MODEL_SYMBOLS: self.symbols}

    def align(
        self,
        data_keys: Mapping[str, Sequence[str | None]] | Sequence[str | None],
        min_overlap: float = DEFAULT_MIN_OVERLAP,
        where: str = "the data",
    ) -> GeneAlignment:
        """Match the dataset's genes to this vocabulary by the best pairing of a model key with
        one of ``data_keys`` (name -> one name per data column; a plain list is the var_names).
        Raises if the chosen key repeats a name or too few genes match."""
        if not 0 <= min_overlap <= 1:  # NaN too: every overlap passed a NaN or negative bound
            raise ValueError(
                f"minimum gene overlap {min_overlap}: it is a fraction of the model's genes, "
                "between 0 and 1 (default 0.5)"
            )
        if not isinstance(data_keys, Mapping):
            data_keys = {VAR_NAMES: data_keys}
        data = {k: _clean(v) for k, v in data_keys.items()}
        n_data = len(next(iter(data.values()), []))
        best: tuple[int, str, str, np.ndarray] | None = None
        tried: dict[str, int] = {}
        for mk, model_names in self.keys().items():
            for dk, names in data.items():
                index = _match(model_names, names)
                n = int((index >= 0).sum())
                tried[f"{mk} ~ {dk}"] = n
                if best is None or n > best[0]:
                    best = (n, mk, dk, index)
        if best is None:
            raise ValueError(f"{where}: no gene names to match; give the genes names")
        n, mk, dk, index = best
        check_unique_gene_ids(data[dk], where if dk == VAR_NAMES else f"{where}, {dk}")
        al = GeneAlignment(index, len(self.ids), n_data, (mk, dk), tried)
        if al.overlap < min_overlap:
            raise ValueError(self._low_overlap(al, data, min_overlap))
        log.info(
            "%s: %d of the model's %d genes matched by %s (tried: %s)",
            where, n, len(self.ids), al.matched_by, tried,
        )  # fmt: skip
        return al

    def _low_overlap(self, al: GeneAlignment, data: dict[str, list[str]], min_overlap) -> str:
        expected = (
            "Ensembl ids (e.g. ENSG00000141510)" if looks_like_ensembl(self.ids) else "gene ids"
        )
        if not self.has_ids:
            expected = f"gene symbols like {list(self.symbols[:3])}"
        elif MODEL_SYMBOLS in self.keys():
            expected += f" or symbols (e.g. {self.symbols[0]})"
        found = "; ".join(f"{k} like {[g for g in v if g][:3]}" for k, v in data.items())
        tried = ", ".join(f"{k}: {n}" for k, n in al.tried.items())
        return (
            f"only {al.n_matched} of the model's {len(self.ids)} genes "
            f"({al.overlap:.1%}) are in the data; at least {min_overlap:.0%} are needed. "
            f"Keys tried (genes matched): {tried}. The model expects {expected}; the data has "
            f"{found}. Put the model's gene names in var_names or in var['gene_ids'] "
            "(ids, or var['feature_id']) or var['feature_name'] (symbols)."
        )

    def to_dict(self) -> dict[str, list[str]]:
        return {"ids": list(self.ids), "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, d: dict[str, list[str]]) -> GeneVocabulary:
        return cls(tuple(d["ids"]), tuple(d.get("symbols") or ()))
