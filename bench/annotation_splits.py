"""The cross-study annotation bench's data: labels harmonised by hand, and its split families.

Harmonised labels: each dataset's ``cell_type`` value -> the Cell Ontology (CL) term it names,
with the term's CL name written beside it; both are checked against the CL release that
``cellxgene-ontology-guide`` ships (``verify_terms``: an unknown id or a different name stops the
bench). Choices made by hand:

- 3-chemistry PBMC: ``Mono_CD14`` is "CD14-positive monocyte" and ``Mono_CD16`` "non-classical
  monocyte" (siblings under "monocyte"; CL's "CD14-low, CD16-positive monocyte" sits *below*
  "CD14-positive monocyte", which would credit a CD14 answer for a CD16 cell). ``MK`` is
  "megakaryocyte", ``HSC`` "hematopoietic stem cell" (as the source names them).
- FACS-sorted Zheng PBMC (the sort markers): CD4+/CD45RO+ ``memoryt`` "CD4-positive, alpha-beta
  memory T cell", CD4+/CD25+ ``regulatoryt`` the CD4+CD25+ regulatory T cell, CD4+ ``thelper``
  "CD4-positive helper T cell", CD4+/CD45RA+/CD25- ``naivet`` and CD8+/CD45RA+
  ``naivecytotoxic`` the naive thymus-derived CD4 / CD8 alpha-beta T cells, CD8+ ``cytotoxict``
  "CD8-positive, alpha-beta cytotoxic T cell", CD14+ ``monocytes`` "CD14-positive monocyte",
  CD19+ ``bcells`` "B cell", CD56+ ``nk`` "natural killer cell". Its ``unknown`` (frozen donor A)
  cells are left out.
- Kang PBMC: no labels (every cell ``unknown``): not used (``kang_has_labels`` checks).
- CellBench lung lines: cell lines are not CL cell types; their labels stay flat (exact match).

When the query's truth is finer than the reference (the cross-study split), a query cell's
reference label is the reference label whose term is the most specific one equal to or above
the cell's own term ("the reference holds the cell"); cells no reference term covers are not
scored (here every sorted type is covered: ``memoryt`` -> ``T_CD4``, ``monocytes`` ->
``Mono_CD14``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import anndata as ad
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PBMC3 = "pbmc_3chem_symphony_small.h5ad"
ZHENG = "pbmc_zheng_sorted_donorA_mudan.h5ad"
KANG = "pbmc_kang_ctrl_stim_harmony.h5ad"
CELLBENCH = "cellbench_lung_celllines.h5ad"
TERM_COLUMN = "cell_type_ontology_term_id"  # the Census schema's column; the index reads it
FAMILIES = ("pbmc-cross", "pbmc-rotation", "cellbench-lotech")

TERMS: dict[str, dict[str, tuple[str, str]]] = {  # file -> cell_type -> (CL id, its CL name)
    PBMC3: {
        "T_CD4": ("CL:0000624", "CD4-positive, alpha-beta T cell"),
        "T_CD8": ("CL:0000625", "CD8-positive, alpha-beta T cell"),
        "B": ("CL:0000236", "B cell"),
        "NK": ("CL:0000623", "natural killer cell"),
        "Mono_CD14": ("CL:0001054", "CD14-positive monocyte"),
        "Mono_CD16": ("CL:0000875", "non-classical monocyte"),
        "DC": ("CL:0000451", "dendritic cell"),
        "MK": ("CL:0000556", "megakaryocyte"),
        "HSC": ("CL:0000037", "hematopoietic stem cell"),
    },
    ZHENG: {
        "nk": ("CL:0000623", "natural killer cell"),
        "bcells": ("CL:0000236", "B cell"),
        "memoryt": ("CL:0000897", "CD4-positive, alpha-beta memory T cell"),
        "regulatoryt": ("CL:0000792", "CD4-positive, CD25-positive, alpha-beta regulatory T cell"),
        "thelper": ("CL:0000492", "CD4-positive helper T cell"),
        "cytotoxict": ("CL:0000794", "CD8-positive, alpha-beta cytotoxic T cell"),
        "naivet": ("CL:0000895", "naive thymus-derived CD4-positive, alpha-beta T cell"),
        "naivecytotoxic": ("CL:0000900", "naive thymus-derived CD8-positive, alpha-beta T cell"),
        "monocytes": ("CL:0001054", "CD14-positive monocyte"),
    },
}


@cache
def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def verify_terms() -> str:
    """Check every hand-set term id and name against the CL release; returns the release."""
    parser = _parser()
    for file, table in TERMS.items():
        for label, (term, name) in table.items():
            if not parser.is_valid_term_id(term, "CL"):
                raise ValueError(f"{file}: {label!r} -> {term} is not a valid CL term")
            found = parser.get_term_label(term)
            if found != name:
                raise ValueError(f"{file}: {label!r} -> {term} is {found!r} in CL, not {name!r}")
    return str(parser.cxg_schema.supported_ontologies.get("CL", {}).get("version", "unknown"))


@cache
def ancestors(term: str) -> frozenset[str]:
    """The term and every CL term above it; a flat label is only itself."""
    if not term.startswith("CL:"):
        return frozenset({term})
    above = _parser().get_term_ancestors(term, include_self=True)
    return frozenset(a for a in above if a.startswith("CL:"))


@dataclass
class Split:
    family: str
    name: str
    ref: ad.AnnData  # obs: batch, cell_type (+ TERM_COLUMN where the labels have terms)
    query: ad.AnnData  # obs: batch (+ the query's own labels, unused by the methods)
    truth: np.ndarray  # each query cell's reference label ('' where the reference holds none)
    truth_term: np.ndarray  # each query cell's own term (CL id), or its flat label
    terms: dict[str, str]  # reference label -> its term, or the label itself when flat


def _read(file: str) -> ad.AnnData:
    return ad.read_h5ad(DATA / file)


def _with_terms(a: ad.AnnData, file: str) -> ad.AnnData:
    a.obs[TERM_COLUMN] = a.obs["cell_type"].astype(str).map(lambda x: TERMS[file][x][0])
    return a


def _holder(term: str, terms: dict[str, str]) -> str:
    """The reference label whose term is the most specific one at or above ``term`` ('')."""
    above = [(len(ancestors(t)), label) for label, t in terms.items() if t in ancestors(term)]
    return max(above)[1] if above else ""


def _split(family: str, name: str, ref: ad.AnnData, query: ad.AnnData, file_q: str | None):
    ref_labels = sorted(set(ref.obs["cell_type"].astype(str)))
    has_terms = TERM_COLUMN in ref.obs
    named = dict(zip(ref.obs["cell_type"].astype(str), ref.obs[TERM_COLUMN])) if has_terms else {}
    terms = {x: named.get(x, x) for x in ref_labels}
    own = query.obs["cell_type"].astype(str).to_numpy()
    own_term = np.array([TERMS[file_q][x][0] for x in own]) if file_q else own
    truth = np.array([_holder(t, terms) if has_terms else (t if t in terms else "")
                      for t in own_term])  # fmt: skip
    return Split(family, name, ref, query, truth, own_term, terms)


def subsample(a: ad.AnnData, max_cells: int | None, seed: int = 0) -> ad.AnnData:
    if not max_cells or a.n_obs <= max_cells:
        return a
    keep = np.sort(np.random.default_rng(seed).choice(a.n_obs, max_cells, replace=False))
    return a[keep].copy()


def _leave_out(full: ad.AnnData, column: str, value: str, max_cells: int | None):
    """(reference: cells whose ``column`` is not ``value``, query: those whose it is)."""
    is_q = (full.obs[column] == value).to_numpy()
    return subsample(full[~is_q].copy(), max_cells), subsample(full[is_q].copy(), max_cells)


def pbmc_cross(max_cells: int | None = None) -> list[Split]:
    """3-chemistry PBMC (all three chemistries) -> the FACS-sorted Zheng PBMC, one query batch
    (one study; its sorted populations were run separately, so their own batches are the cell
    types themselves and are not given to any method)."""
    ref = subsample(_with_terms(_read(PBMC3), PBMC3), max_cells)
    z = _read(ZHENG)
    z = z[z.obs["cell_type"] != "unknown"].copy()
    z.obs["batch"] = "zheng_sorted"
    return [_split("pbmc-cross", "3chem -> Zheng sorted", ref, subsample(z, max_cells), ZHENG)]


def pbmc_rotations(max_cells: int | None = None) -> list[Split]:
    """Each 10x chemistry the query in turn, the other two the reference."""
    full = _with_terms(_read(PBMC3), PBMC3)
    out = []
    for chem in sorted(set(full.obs["batch"].astype(str))):
        ref, query = _leave_out(full, "batch", chem, max_cells)
        out.append(_split("pbmc-rotation", f"query {chem}", ref, query, PBMC3))
    return out


def cellbench_lotech(max_cells: int | None = None) -> list[Split]:
    """CellBench lung lines, leave one technology (obs ``assay``: CEL-seq2, Drop-seq) out: the
    other technology's batches are the reference; labels flat."""
    full = _read(CELLBENCH)
    out = []
    for tech in sorted(set(full.obs["assay"].astype(str))):
        ref, query = _leave_out(full, "assay", tech, max_cells)
        out.append(_split("cellbench-lotech", f"query {tech}", ref, query, None))
    return out


def kang_has_labels() -> bool:
    return bool((_read(KANG).obs["cell_type"].astype(str) != "unknown").any())


def load(families: list[str], max_cells: int | None = None) -> list[Split]:
    build = {"pbmc-cross": pbmc_cross, "pbmc-rotation": pbmc_rotations,
             "cellbench-lotech": cellbench_lotech}  # fmt: skip
    unknown = sorted(set(families) - set(build))
    if unknown:
        raise ValueError(f"unknown split families {unknown}: choose from {list(FAMILIES)}")
    return [s for f in families for s in build[f](max_cells)]
