"""Every registered version is also an MLflow model: ``mlflow models serve -m models:/NAME@ALIAS``.

The run behind a version gets an ``MLmodel`` file at its artifact root (beside ``model/`` and,
once attached, ``index/``): a ``python_function`` flavor whose loader is this module, found by
import path. Nothing is pickled and no code is copied into the artifacts: ``_load_pyfunc`` reads
the safetensors model and the FAISS index that the version already holds, so an index attached
after registration is what ``predict`` searches (its ``MLmodel`` is rewritten then, with the label
columns as the output schema).

``predict`` takes a DataFrame of raw counts (one row per cell, one column per gene named by id or
symbol, an optional ``batch`` column and the model's other covariate columns) and answers the
label columns of ``censusvi annotate``, computed by the same function. The input has no schema:
the genes are the caller's panel (ids or symbols, any subset the model can align), which a fixed
column list would refuse or silently drop.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from censusvi import defaults
from censusvi.annotate.pipeline import annotate
from censusvi.outputs import TEXT_ANSWERS, answer_columns

BATCH_COLUMN = "batch"  # the input frame's optional batch column (a contract of predict)
DEFAULT_BATCH = "query"  # every cell's batch when the input has no batch column (a new batch)


def _params_schema():
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema(
        [
            ParamSpec("k", "long", defaults.K),
            ParamSpec("unknown_threshold", "double", defaults.UNKNOWN_THRESHOLD),
            ParamSpec("class_balance", "double", defaults.CLASS_BALANCE),
            ParamSpec("method", "string", None),  # None: resolve_method's default
        ]
    )


def label_columns_of(index) -> list[tuple[str, str]]:
    """(name, MLflow type) of each column ``censusvi annotate`` writes with ``index``: per label
    key, the predicted label, probability and uncertainty, and the ontology-aware answer where the
    index maps the key's labels to the Cell Ontology."""
    out = []
    for key in index.labels.columns:
        ontology = index.ontology(key) is not None
        for col, name in answer_columns(key).items():
            if ontology or not col.startswith("ontology_"):
                out.append((name, "string" if col in TEXT_ANSWERS else "double"))
    return out


def signature(columns: list[tuple[str, str]] | None):
    """No input schema (see the module's note); the label columns out, once an index gives
    them (``label_columns_of``); ``annotate``'s options as parameters."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = Schema([ColSpec(t, name) for name, t in columns]) if columns else None
    return ModelSignature(inputs=None, outputs=outputs, params=_params_schema())


def pip_requirements() -> list[str]:
    """This censusvi (torch, faiss and pandas come with it) and the MLflow that wrote the model."""
    import mlflow

    from censusvi import __version__

    return [f"censusvi[mlflow]=={__version__}", f"mlflow=={mlflow.__version__}"]


def log_mlmodel(client, run_id: str, index_dir: str | os.PathLike | None) -> None:
    """Write (or rewrite) the ``MLmodel`` and environment files at the root of ``run_id``'s
    artifacts; the output schema names the label columns of ``index_dir``'s keys."""
    import mlflow.pyfunc

    columns = None
    if index_dir is not None:
        from censusvi.annotate.index import load_index

        columns = label_columns_of(load_index(index_dir))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # An input example would be a row of every gene, checked by a predict that needs an index.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        path = Path(tmp) / "mlmodel"
        mlflow.pyfunc.save_model(
            path,
            loader_module=__name__,
            signature=signature(columns),
            pip_requirements=pip_requirements(),
        )
        client.log_artifacts(run_id, str(path))


class VersionModel:
    """A loaded version: the model and (when the version has one) its index."""

    def __init__(self, root: str | os.PathLike) -> None:
        from censusvi.annotate.index import load_index
        from censusvi.model.io import load_model

        root = Path(root)
        self.model = load_model(root / "model" if (root / "model").is_dir() else root)
        self.index = load_index(root / "index") if (root / "index").is_dir() else None

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """The label columns of ``censusvi annotate`` for each row of ``model_input``; a bad
        input is an MLflow INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server)."""
        from mlflow.exceptions import MlflowException

        try:
            return predict_labels(self.model, self.index, model_input, params)
        except ValueError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from e


def _load_pyfunc(path: str, model_config: dict | None = None) -> VersionModel:
    """MLflow's loader hook: ``path`` is the downloaded version (``MLmodel``, ``model/``,
    ``index/``)."""
    return VersionModel(path)


def predict_labels(model, index, frame, params: dict | None = None) -> pd.DataFrame:
    """``annotate`` on the cells of ``frame``; one row per input row, in its order and index (a
    cell with no counts over the model's genes is not mapped: its labels are missing)."""
    if index is None:
        raise ValueError(
            "this model version has no index, so it cannot annotate: attach one (the embed job "
            "with --model models:/NAME/VERSION) or register the model with "
            "`censusvi models register MODEL --index DIR`"
        )
    options = request_options(params)
    adata = counts_anndata(model, frame)
    out, _ = annotate(model, index, adata, BATCH_COLUMN, **options)
    columns = label_columns_of(index)
    labels = out.obs[[name for name, _ in columns]].reindex(adata.obs_names)
    for name, t in columns:  # categories do not travel as JSON; strings do
        if t == "string":
            labels[name] = labels[name].astype(object).where(labels[name].notna(), None)
    labels.index = frame.index
    return labels


def request_options(params: dict | None) -> dict:
    """``annotate``'s options from MLflow's params (its schema: ``_params_schema``), by the
    rules of every server (``check_served``: the Serve app's): a number spelled as text is
    read, a fraction of a neighbour or k above ``defaults.MAX_K`` is refused."""
    from censusvi.annotate.method import check_served
    from censusvi.typed import typed

    given = dict(params or {})
    options = {
        "k": typed("k", given.pop("k", defaults.K), int, text=True),
        "unknown_threshold": typed(
            "unknown_threshold",
            given.pop("unknown_threshold", defaults.UNKNOWN_THRESHOLD),
            float,
            text=True,
        ),
        "class_balance": typed(
            "class_balance", given.pop("class_balance", defaults.CLASS_BALANCE), float, text=True
        ),
        "method": typed("method", given.pop("method", None), str | None),
    }
    if given:
        raise ValueError(
            f"unknown parameter(s) {sorted(map(str, given))}: this model takes k, "
            "unknown_threshold, class_balance and method"
        )
    check_served(**options)
    return options


def _obs_column(values: pd.Series) -> np.ndarray:
    """A batch or covariate column as text, a missing value left missing (annotate refuses it:
    a NaN is not a batch called "nan")."""
    return values.astype(str).where(values.notna(), None).to_numpy()


def counts_anndata(model, frame):
    """The cells of ``frame`` as the AnnData ``censusvi annotate`` reads: gene columns matched by
    the model's id, else by its symbol; ``batch`` and the model's covariate columns as obs."""
    import anndata as ad

    from censusvi.data.counts import check_counts, to_csr32

    if not isinstance(frame, pd.DataFrame):
        raise ValueError(
            f"the input is a {type(frame).__name__}; send a DataFrame (dataframe_split JSON) of "
            "raw counts: one row per cell, one column per gene"
        )
    obs_keys = [BATCH_COLUMN, *model.covariate_keys]
    genes = [c for c in frame.columns if c not in obs_keys]
    if repeated := sorted({str(c) for c in frame.columns[frame.columns.duplicated()]}):
        raise ValueError(
            f"column(s) {repeated[:5]} appear more than once; send each gene and obs column once"
        )
    if len(frame) == 0 or not genes:
        raise ValueError(
            f"the input has {len(frame)} rows and {len(genes)} gene columns; send one row per "
            "cell and one column of raw counts per gene (named by id or symbol)"
        )
    ids = set(model.genes.ids)
    by_symbol: dict[str, str] = {}
    for gid, sym in zip(model.genes.ids, model.genes.symbols):
        by_symbol.setdefault(sym, gid)
    var_ids = [str(c) if str(c) in ids else by_symbol.get(str(c), str(c)) for c in genes]
    x = to_csr32(frame[genes].to_numpy(), "the input's counts")
    check_counts(x, "the input's counts")
    obs = pd.DataFrame(index=[str(i) for i in range(len(frame))])
    obs[BATCH_COLUMN] = _obs_column(frame[BATCH_COLUMN]) if BATCH_COLUMN in frame else DEFAULT_BATCH
    for key in model.covariate_keys:
        if key in frame:
            obs[key] = _obs_column(frame[key])
    var = pd.DataFrame({"gene_ids": var_ids}, index=[str(j) for j in range(len(var_ids))])
    return ad.AnnData(x, obs=obs, var=var)
