"""What ``load_index`` checks before an index is used: each file holds what ``censusvi index``
wrote, and index.json's tables agree with the FAISS index, the label table and the heads. An
edited or damaged directory fails here in one ``IndexDamaged`` line, not mid-annotation (a
traceback, a 5xx) nor, worse, as answers that are silently wrong (renamed or reordered head
classes, a metric the index was not built with)."""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate import faiss_index as fx
from censusvi.numeric import is_finite, is_whole
from censusvi.untrusted import read_json_file

HEADS_FILE = "heads.safetensors"  # the label heads' weights (annotate/head.py), no pickle
MAX_HEADS_BYTES = 256 * 2**20  # a head is 128 x (latent + classes) floats: kB to a few MB
KINDS = tuple(k for k in defaults.INDEX_KINDS if k != "auto")  # what index.json's kind names
OBJECTS = ("label_frequency", "heads", "novelty", "neighbour_distance", "ontology")  # {} or null
MAX_K_FACTOR = 64  # IVF-PQ's re-rank pool, as a multiple of k (the build tunes 2-16)
LEGACY_IVF = r"ivf\d+"  # IVF-Flat as indexes written before the kinds were named recorded it


class IndexDamaged(ValueError):
    """An index directory that cannot be what ``censusvi index`` wrote: which file, and why."""


REBUILD = "rebuild the index with `censusvi index`"


def damaged(where: Path, e: Exception) -> IndexDamaged:
    """The one line for a file of an index that a reader refused (``e``: ours or the reader's)."""
    if isinstance(e, IndexDamaged):
        return IndexDamaged(f"{where}: {e}; {REBUILD}")
    what = " ".join(str(e).split())[:160] or type(e).__name__
    return IndexDamaged(f"{where} is damaged or not censusvi's ({what}); {REBUILD}")


def read_meta(path: str | Path) -> dict:
    """The checked index.json of the index at ``path``: what a caller needs without the vectors
    and labels (the Serve app's check before it starts)."""
    path = Path(path)
    if not (path / "index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a censusvi index (built by `censusvi index`): index.json is missing"
        )
    try:
        meta = read_json_file(path / "index.json", "the index's metadata")
        check_meta(meta)
    except (ValueError, OSError) as e:  # IndexDamaged, and read_json_file's refusals, too
        raise damaged(path / "index.json", e) from None
    return meta


def check_meta(meta) -> None:
    """index.json alone: its types and ranges."""
    if not isinstance(meta, dict):
        raise IndexDamaged(f"holds a {type(meta).__name__}, not an object")
    if meta.get("metric", "l2") not in defaults.METRICS:
        raise IndexDamaged(f"metric {meta.get('metric')!r} is not one of {list(defaults.METRICS)}")
    if "kind" in meta and not (
        meta["kind"] in KINDS or re.fullmatch(LEGACY_IVF, str(meta["kind"]))
    ):
        raise IndexDamaged(f"kind {meta['kind']!r} is not one of {list(KINDS)}")
    if "dim" in meta and not (is_whole(meta["dim"]) and meta["dim"] >= 1):
        raise IndexDamaged(f"dim {meta['dim']!r} is not a whole number >= 1")
    for name in ("nprobe", "nlist"):  # faiss clamps nprobe to nlist; a 10^30 broke the h5ad
        if name in meta and not (is_whole(meta[name]) and 1 <= meta[name] < 2**31):
            raise IndexDamaged(f"{name} {meta[name]!r} is not a whole number from 1 to 2^31 - 1")
    if "k_factor" in meta and not (
        is_finite(meta["k_factor"]) and 1 <= meta["k_factor"] <= MAX_K_FACTOR
    ):  # the re-rank pool is k_factor x k rows per cell: 1e5 ran out of memory
        raise IndexDamaged(
            f"k_factor {meta['k_factor']!r} is not a number from 1 to {MAX_K_FACTOR} "
            f"(the build tunes {fx.K_FACTORS[0]}-{fx.K_FACTORS[-1]})"
        )
    for name in OBJECTS:
        if not isinstance(meta.get(name) or {}, dict):
            raise IndexDamaged(f"{name} is not an object")
    for key, stored in (meta.get("label_frequency") or {}).items():
        _check_frequency(key, stored)
    _check_tables(meta)


def _check_tables(meta: dict) -> None:
    """The out-of-reference fit and the ontology entries (objects: ``check_meta``) hold together
    (``novelty.check_stored``, ``LabelOntology.checked``)."""
    from censusvi.annotate import novelty
    from censusvi.annotate.ontology import LabelOntology

    try:
        if meta.get("novelty"):
            novelty.check_stored(meta["novelty"])
        if meta.get("neighbour_distance"):
            novelty.check_fit(novelty.legacy_fit(meta["neighbour_distance"]))
    except (TypeError, KeyError, ValueError) as e:
        raise IndexDamaged(str(e)) from None
    for key, d in (meta.get("ontology") or {}).items():
        try:
            LabelOntology.checked(d)
        except (TypeError, ValueError) as e:
            raise IndexDamaged(f"ontology of {key!r} {e}") from None


def check_faiss(index: faiss.Index, meta: dict) -> None:
    """index.faiss against index.json: the dimension and the metric it was built with."""
    if "dim" in meta and index.d != meta["dim"]:
        raise IndexDamaged(f"holds {index.d}-d vectors, but index.json says dim {meta['dim']}")
    metric = meta.get("metric", "l2")
    if index.metric_type != fx.faiss_metric(metric):
        raise IndexDamaged(f"was not built for the metric {metric!r} that index.json names")


def check_labels(labels: pd.DataFrame, meta: dict, n_vectors: int) -> dict[str, set[str]]:
    """labels.parquet against the FAISS index and index.json; returns each key's labels."""
    if len(labels) != n_vectors:
        raise IndexDamaged(f"{len(labels)} label rows for {n_vectors} indexed cells")
    keys = meta.get("label_keys")
    if keys is not None and list(labels.columns) != list(keys):
        raise IndexDamaged(f"columns {list(labels.columns)}, but index.json names {keys}")
    for key in labels.columns:  # censusvi writes every label as text: a missing one is an edit
        if missing := int(labels[key].isna().sum()):
            raise IndexDamaged(f"{missing} of {len(labels)} labels of {key!r} are missing (null)")
    held = {key: set(map(str, pd.unique(labels[key]))) for key in labels.columns}
    for key, stored in (meta.get("label_frequency") or {}).items():
        if set(map(str, stored["labels"])) != held.get(key):
            raise IndexDamaged(
                f"index.json's label_frequency of {key!r} names other labels than this table holds"
            )
    return held


def _check_frequency(key: str, stored) -> None:
    where = f"label_frequency of {key!r}"
    if not isinstance(stored, dict):
        raise IndexDamaged(f"{where} is not an object")
    names, shares = stored.get("labels"), stored.get("shares")
    if not isinstance(names, list) or not isinstance(shares, list) or len(names) != len(shares):
        raise IndexDamaged(f"{where} needs lists 'labels' and 'shares' of one length")
    if not all(is_finite(s) and s > 0 for s in shares):
        raise IndexDamaged(f"{where} holds shares that are not all > 0")
    if len(set(map(str, names))) != len(names):
        raise IndexDamaged(f"{where} names a label twice")
    if abs(sum(shares) - 1.0) > 1e-3:
        raise IndexDamaged(f"{where} holds shares that sum to {sum(shares):g}, not 1")


def load_heads(path: Path, meta: dict, held: dict[str, set[str]]) -> dict:
    """heads.safetensors, each head's classes checked against the labels (a head's outputs are
    its key's labels, sorted: a renamed or reordered class would answer another label)."""
    listed = meta.get("heads") or {}
    if not (path / HEADS_FILE).is_file():
        if listed:
            raise IndexDamaged(f"is missing, but index.json lists heads for {sorted(listed)}")
        return {}
    if not listed:
        raise IndexDamaged("is present, but index.json lists no heads")
    from safetensors.torch import load_file

    from censusvi.annotate.head import LabelHead

    if (size := (path / HEADS_FILE).stat().st_size) > MAX_HEADS_BYTES:
        raise IndexDamaged(f"is {size:,} bytes; label heads take a few MB at most")
    tensors = load_file(str(path / HEADS_FILE))
    heads = {}
    for key, info in listed.items():
        classes = info.get("classes") if isinstance(info, dict) else None
        if key not in held or not isinstance(classes, list):
            raise IndexDamaged(f"index.json lists a head for {key!r} without its classes")
        if not all(isinstance(c, str) for c in classes) or classes != sorted(held[key]):
            raise IndexDamaged(
                f"index.json's classes of the {key!r} head are not the sorted labels of "
                "labels.parquet"
            )
        out = tensors.get(f"{key}.2.bias")
        if out is not None and out.shape[0] != len(classes):
            raise IndexDamaged(
                f"the {key!r} head has {out.shape[0]} outputs, but index.json lists "
                f"{len(classes)} classes"
            )
        _check_head_tensors(key, {k: v for k, v in tensors.items() if k.startswith(f"{key}.")})
        heads[key] = LabelHead.from_tensors(tensors, key, classes)
        if not (np.isfinite(heads[key].temperature) and heads[key].temperature > 0):
            raise IndexDamaged(f"the {key!r} head's temperature is not a number > 0")
    return heads


def _check_head_tensors(key: str, own: dict) -> None:
    """A head answers through every tensor: a NaN, a zero scale or an integer tensor (cast by
    ``load_state_dict`` in silence) gave one class for every cell."""
    import torch

    bad = [k for k, v in own.items() if v.dtype != torch.float32 or not torch.isfinite(v).all()]
    if bad:
        raise IndexDamaged(
            f"the {key!r} head's {', '.join(sorted(bad)[:3])} are not finite float32 values"
        )
    mean, scale = own.get(f"{key}.mean"), own.get(f"{key}.scale")
    if mean is None or scale is None or mean.ndim != 1 or mean.shape != scale.shape:
        raise IndexDamaged(f"the {key!r} head's mean and scale are not two vectors of one length")
    if not bool((scale > 0).all()):
        raise IndexDamaged(f"the {key!r} head's scale is not > 0 everywhere")


def check_fits(
    model, meta: dict, index_name: str = "the index", model_name: str = "this model"
) -> None:
    """The index must hold ``model``'s latents: its dimension, and (for indexes that record it)
    the digest of the encoder that embedded the reference (``meta``: its index.json). An index of another model answers
    wrong labels without any error of its own (a fine-tuned model and its base differ here)."""
    n_latent = model.config.n_latent
    if meta.get("dim") != n_latent:
        raise ValueError(
            f"{index_name} holds {meta.get('dim')}-d embeddings but {model_name}'s latent is "
            f"{n_latent}-d: build the index with this model (`censusvi index`)"
        )
    built_with = meta.get("encoder_digest")  # None: an index older than the digest
    if built_with is not None and built_with != (own := model.encoder_digest()):
        raise ValueError(
            f"{index_name} was built with another model (encoder {built_with}; {model_name}'s is "
            f"{own}), e.g. the base of a fine-tuned model: build the index with this model "
            "(`censusvi index`)"
        )
