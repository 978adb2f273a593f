"""Ontology-aware answers: label probabilities summed up the Cell Ontology.

Each reference label maps to a Cell Ontology (CL) term: the reference's ``KEY_ontology_term_id``
column where it has one (the Census schema's ``cell_type_ontology_term_id``), else the term whose
name is exactly the label. The probability of a term is the summed probability of the labels at
or below it, and the answer is the most specific term whose probability clears a threshold: a
cell split 0.45 / 0.40 between "CD4-positive, alpha-beta T cell" and "CD8-positive, alpha-beta T
cell" (neither above 0.5) is a confident (0.85) "mature alpha-beta T cell", their lowest common
ancestor. Labels without a term stay flat: they can only answer as themselves.

The index keeps the part of the ontology its labels need (``LabelOntology``: terms, names,
ancestors), so annotating, serving and the MLflow model need no ontology package; building it
reads the CL that ``cellxgene-ontology-guide`` ships (offline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from censusvi.numeric import is_whole

log = logging.getLogger(__name__)
ONTOLOGY = "CL"
TERM_COLUMN_SUFFIX = "_ontology_term_id"  # obs column of a label key's terms (Census schema)


@dataclass(frozen=True)
class LabelOntology:
    """The Cell Ontology as far as one label key's labels need it."""

    version: str  # the CL release the terms were read from
    label_terms: dict[str, str]  # label -> term id, for the labels that map
    ancestors: dict[str, list[str]]  # term of a label -> every ancestor, itself included
    names: dict[str, str]  # term id -> its CL name, for every term in ``ancestors``
    depth: dict[str, int]  # term id -> how many CL terms are above it (more: more specific)
    flat: list[str]  # labels without a term: they answer as themselves

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LabelOntology:
        return cls(
            d["version"], d["label_terms"], d["ancestors"], d["names"], d["depth"], d["flat"]
        )

    @classmethod
    def checked(cls, d) -> LabelOntology:
        """``from_dict``, or a ValueError naming what does not hold together (an edited entry
        fails at load, not mid-annotation): each label's term has its ancestors, each of them a
        name and a depth."""
        fields = ("version", "label_terms", "ancestors", "names", "depth", "flat")
        if not isinstance(d, dict) or any(f not in d for f in fields):
            raise ValueError(f"is not an object with {', '.join(fields)}")
        onto = cls.from_dict(d)
        if not all(isinstance(x, dict) for x in (onto.label_terms, onto.ancestors, onto.names,
                                                 onto.depth)) or not isinstance(onto.flat, list):  # fmt: skip
            raise ValueError("label_terms, ancestors, names, depth must be objects, flat a list")
        for label, term in onto.label_terms.items():
            chain = onto.ancestors.get(term)
            if not isinstance(chain, list) or term not in chain:
                raise ValueError(f"the term {term!r} of label {label!r} has no ancestors entry")
            lost = [a for a in chain if a not in onto.names or not is_whole(onto.depth.get(a))]
            if lost:
                raise ValueError(f"ancestor(s) {lost[:3]} of {term!r} have no name or depth")
        texts = [*onto.label_terms, *onto.label_terms.values(), *onto.names, *onto.names.values()]
        if not all(isinstance(t, str) for t in [*texts, *onto.flat, onto.version]):
            raise ValueError("labels, terms, names, flat labels and the version must be text")
        return onto


def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def ontology_of(labels: Iterable[str], term_ids: dict[str, str] | None = None, parser=None):
    """The ``LabelOntology`` of ``labels`` (``term_ids``: label -> CL id where the reference
    gives one), or None when no label maps to a term; ``parser``: an ``OntologyParser`` already
    loaded (reading the CL takes about a second)."""
    parser = parser or _parser()
    label_terms, flat = {}, []
    for label in sorted(set(map(str, labels))):
        term = (term_ids or {}).get(label) or parser.get_term_id_by_label(label, ONTOLOGY)
        if term and term.startswith(f"{ONTOLOGY}:") and parser.is_valid_term_id(term, ONTOLOGY):
            label_terms[label] = term
        else:
            flat.append(label)
    if not label_terms:
        return None
    ancestors = {
        t: [a for a in parser.get_term_ancestors(t, include_self=True) if a.startswith("CL:")]
        for t in set(label_terms.values())
    }
    every = sorted({a for chain in ancestors.values() for a in chain})
    names = {t: parser.get_term_label(t) for t in every}
    depth = {t: sum(a.startswith("CL:") for a in parser.get_term_ancestors(t)) for t in every}
    version = parser.cxg_schema.supported_ontologies.get(ONTOLOGY, {}).get("version", "unknown")
    if flat:
        log.info("%d of %d labels have no Cell Ontology term and stay flat: %s", len(flat),
                 len(flat) + len(label_terms), flat[:5])  # fmt: skip
    return LabelOntology(str(version), label_terms, ancestors, names, depth, flat)


def reference_terms(obs: pd.DataFrame, key: str) -> dict[str, str] | None:
    """label -> term id from the reference's ``KEY_ontology_term_id`` column (the most common
    term of each label), or None without that column."""
    column = f"{key}{TERM_COLUMN_SUFFIX}"
    if column not in obs.columns:
        return None
    pairs = obs[[key, column]].astype(str)
    return (
        pairs.groupby(key, observed=True)[column].agg(lambda s: s.value_counts().index[0]).to_dict()
    )


def label_ontologies(obs: pd.DataFrame, keys: Iterable[str]) -> dict[str, dict]:
    """``{key: LabelOntology.to_dict()}`` for each label key of the reference ``obs`` whose
    labels (some of them) map to Cell Ontology terms: what the index stores."""
    found, parser = {}, _parser()
    for key in keys:
        onto = ontology_of(obs[key].astype(str).unique(), reference_terms(obs, key), parser)
        if onto is None:
            log.info("label key %r: no label is a Cell Ontology term; answers stay flat", key)
        else:
            found[key] = onto.to_dict()
    return found


def _nodes(onto: LabelOntology, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The answerable nodes, most specific first, and the (labels x nodes) membership matrix.

    A node is a CL term above some label, or a flat label itself. More specific: fewer labels
    below it, then more ancestors (deeper), then its id (a stable order)."""
    terms = sorted({a for t in onto.ancestors.values() for a in t})
    nodes = terms + [f"label:{x}" for x in labels if x not in onto.label_terms]
    member = np.zeros((len(labels), len(nodes)), dtype=np.float64)
    col = {n: j for j, n in enumerate(nodes)}
    for i, x in enumerate(labels):
        term = onto.label_terms.get(x)
        for a in onto.ancestors[term] if term else [f"label:{x}"]:
            member[i, col[a]] = 1.0
    depth = [onto.depth.get(n, 0) for n in nodes]  # a flat label: 0, but 1 label below it
    order = sorted(range(len(nodes)), key=lambda j: (member[:, j].sum(), -depth[j], nodes[j]))
    return [nodes[j] for j in order], member[:, order]


def backoff(
    prob: np.ndarray, labels: np.ndarray, onto: LabelOntology, threshold: float
) -> pd.DataFrame:
    """Columns ``term_id`` ('' for a flat label), ``label`` (the term's name) and ``probability``: for each
    row of ``prob`` (cells x ``labels``), the most specific node whose summed probability is at
    least ``threshold``; where none is, the most probable node (ties: the most specific)."""
    nodes, member = _nodes(onto, np.asarray(labels).astype(str))
    p = np.clip(prob @ member, 0.0, 1.0)  # (cells x nodes), most specific node first
    clears = p >= threshold - 1e-12  # a float sum of exactly the threshold clears it
    pick = np.where(clears.any(1), clears.argmax(1), p.argmax(1))
    chosen = [nodes[j] for j in pick]
    ids = np.array([n if not n.startswith("label:") else "" for n in chosen], dtype=object)
    names = np.array(
        [onto.names[n] if n in onto.names else n.removeprefix("label:") for n in chosen],
        dtype=object,
    )
    return pd.DataFrame({"term_id": ids, "label": names, "probability": p[np.arange(len(p)), pick]})
