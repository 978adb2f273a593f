"""Model versions that carry everything needed to serve them, and a gated alias promotion.

A version's artifacts are ``model/`` (config.json + safetensors) and, for a servable version,
``index/`` (FAISS + label table + the index's held-out label-transfer evaluation), with an
``MLmodel`` at their root: the version is an MLflow python_function model (registry/pyfunc.py).
Its evaluation metrics are the registering run's metrics named ``eval.*``; promotion compares
them with the current alias holder's and refuses a worse candidate with the numbers. Every alias move is
appended to a registered-model tag (``alias_history.<alias>``), which is what ``rollback`` undoes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from censusvi.registry.mlflow_store import (
    DEFAULT_ALIAS,
    DEFAULT_MODEL_NAME,
    _experiment_id,
    git_commit,
    is_not_found,
    log_folder,
    new_version,
    reaches_registry,
    use_tracking,
)
from censusvi.registry.uris import check_model_name, parse_model_uri
from censusvi.untrusted import read_json_file

EVAL_PREFIX = "eval."
LOWER_IS_BETTER = ("ece", "elbo", "nll", "loss")  # metric-name endings; the rest: higher is better


class PromotionRefused(RuntimeError):
    """The candidate's evaluation is worse than the alias holder's (the message has the numbers)."""


@dataclass(frozen=True)
class VersionFiles:
    """A local copy of a registered (or plain on-disk) model and its index."""

    name: str
    version: str
    model_dir: Path | None  # None: not asked for
    index_dir: Path | None  # None: not asked for, or the version has none


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(use_tracking(uri))


def evaluation_metrics(index_dir: str | os.PathLike | None) -> dict[str, float]:
    """``eval.<label key>.<metric>`` from the index's held-out label-transfer evaluation."""
    if index_dir is None:
        return {}
    meta = read_json_file(Path(index_dir) / "index.json", "the index's metadata")
    return {
        f"{EVAL_PREFIX}{key}.{name}": float(value)
        for key, metrics in meta.get("evaluation", {}).items()
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not name.startswith("n_")
    }


@reaches_registry
def register_version(
    model_dir: str | os.PathLike,
    index_dir: str | os.PathLike | None,
    name: str = DEFAULT_MODEL_NAME,
    uri: str | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> str:
    """Log the model (and its index) as one run's artifacts and register them; returns the version."""
    import mlflow

    from censusvi.annotate.index import load_index
    from censusvi.annotate.index_checks import check_fits
    from censusvi.model.io import load_model, read_config
    from censusvi.registry.pyfunc import log_mlmodel

    check_model_name(name)
    cfg = read_config(model_dir)  # refuses anything that is not a model directory
    model = load_model(model_dir)  # and one whose weights do not load (it must be servable)
    if index_dir is not None:
        check_fits(model, load_index(index_dir).meta, f"the index in {index_dir}", str(model_dir))
    client = _client(uri)
    metrics = {**evaluation_metrics(index_dir), **(extra_metrics or {})}
    with mlflow.start_run(experiment_id=_experiment_id(mlflow.get_tracking_uri())) as run:
        log_folder(client, run.info.run_id, model_dir, "model")
        if index_dir is not None:
            log_folder(client, run.info.run_id, index_dir, "index")
        if metrics:
            mlflow.log_metrics(metrics)
        run_tags = {"git_commit": git_commit(), "model_dir": str(Path(model_dir).resolve())}
        training_run = cfg.get("provenance", {}).get("mlflow_run_id")
        if training_run:  # the Ray job's run that trained it (its epochs' metrics)
            run_tags["training_run_id"] = str(training_run)
        mlflow.set_tags(run_tags)
    log_mlmodel(client, run.info.run_id, index_dir)
    prov = cfg.get("provenance", {})
    tags = {
        "source": str(prov.get("source")),
        "n_genes": str(len(cfg["genes"]["ids"])) if "ids" in cfg.get("genes", {}) else "",
        "n_batches": str(len(cfg["batch_categories"])),
        "has_index": str(index_dir is not None).lower(),
    }
    if "finetune" in prov:  # censusvi finetune: which labels taught the encoder
        tags["finetune_labels_key"] = str(prov["finetune"].get("labels_key"))
    return new_version(client, name, run, tags)


@reaches_registry
def version_metrics(name: str, version: str, uri: str | None = None) -> dict[str, float]:
    client = _client(uri)
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        return {}
    return {
        k: v for k, v in client.get_run(mv.run_id).data.metrics.items() if k.startswith(EVAL_PREFIX)
    }


@reaches_registry
def alias_holder(name: str, alias: str, uri: str | None = None) -> str | None:
    """The version ``name@alias`` points at; None only when the store says it is not set (any
    other failure, an unreachable store included, raises)."""
    client = _client(uri)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as e:
        if is_not_found(e):
            return None
        raise


def compare_metrics(
    candidate: dict[str, float], holder: dict[str, float], tolerance: float = 0.0
) -> list[str]:
    """The shared metrics on which the candidate is worse by more than ``tolerance``, each as
    'name: candidate vs holder'."""
    worse = []
    for key in sorted(set(candidate) & set(holder)):
        lower_better = key.endswith(LOWER_IS_BETTER)
        c, h = candidate[key], holder[key]
        if (c > h + tolerance) if lower_better else (c < h - tolerance):
            direction = "lower" if lower_better else "higher"
            worse.append(f"{key}: {c:.4f} vs {h:.4f} ({direction} is better)")
    return worse


def _check_loads(name: str, version: str, uri: str | None) -> None:
    """Refuse (even with --force) to promote a version whose model does not load: its weights
    are read into a scratch folder, removed afterwards."""
    import tempfile

    from censusvi.model.io import load_model

    with tempfile.TemporaryDirectory(prefix="censusvi-promote-") as tmp:
        files = fetch_version(name, version, tmp, uri, index=False)  # MLflow's errors pass on
        try:
            load_model(files.model_dir)
        except (ValueError, OSError) as e:  # whatever the artifact is, it is not a model
            what = " ".join(str(e).replace(tmp, f"models:/{name}/{version}").split())[:200]
            raise PromotionRefused(
                f"version {version} of {name} does not load as a model ({what}); it was not "
                "promoted: register a model directory `censusvi info` reads"
            ) from None


def _history(tag: str) -> list[str]:
    """An alias's history tag as versions, a version promoted again while it held the alias
    (a retried promote) kept once: rollback goes to the version before, not to itself."""
    versions = [v for v in tag.split(",") if v]
    return [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]


def _append_history(client, name: str, alias: str, version: str) -> None:
    key = f"alias_history.{alias}"
    history = _history(client.get_registered_model(name).tags.get(key, ""))
    if history[-1:] != [version]:
        client.set_registered_model_tag(name, key, ",".join([*history, version]))


def check_alias(alias: str) -> None:
    """MLflow's rules for an alias name (letters, digits, _ and -; not 'latest' nor 'v3'),
    checked before the store is asked, so that the error is about the name. MLflow's own
    validators, not a copy of its rules; they are private, so a release without them leaves the
    check to the store (whose error is one line too)."""
    from mlflow.exceptions import MlflowException

    try:
        from mlflow.utils.validation import (
            _validate_model_alias_name,
            _validate_model_alias_name_reserved,
        )
    except ImportError:
        return

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as e:
        raise ValueError(f"--alias {alias!r}: {e.message}") from None


@reaches_registry
def promote(
    name: str,
    version: str,
    alias: str = DEFAULT_ALIAS,
    force: bool = False,
    tolerance: float = 0.0,
    uri: str | None = None,
) -> str | None:
    """Point ``alias`` at ``version`` unless its evaluation is worse than the holder's; returns
    the previous holder. Fails closed: when the holder cannot be read, nothing moves."""
    from censusvi.numeric import is_finite

    if not (is_finite(tolerance) and tolerance >= 0):
        raise ValueError(
            f"tolerance {tolerance!r}: must be a number >= 0 (how much worse a metric may be)"
        )
    check_alias(alias)
    client = _client(uri)
    # raises with MLflow's message if it does not exist; "01" is version "1"
    version = str(client.get_model_version(name, version).version)
    try:
        holder = alias_holder(name, alias, uri)
    except Exception as e:
        raise PromotionRefused(
            f"{name}@{alias} was not moved to version {version}: its current version could not "
            f"be read, and the metrics gate compares against it ({e})"
        ) from e
    _check_loads(name, version, uri)
    if holder is not None and holder != str(version) and not force:
        worse = compare_metrics(
            version_metrics(name, version, uri), version_metrics(name, holder, uri), tolerance
        )
        if worse:
            raise PromotionRefused(
                f"version {version} is worse than {name}@{alias} (version {holder}) on "
                + "; ".join(worse)
                + ". Promote anyway with --force"
            )
    client.set_registered_model_alias(name, alias, str(version))
    _append_history(client, name, alias, str(version))
    return holder


@reaches_registry
def rollback(name: str, alias: str = DEFAULT_ALIAS, uri: str | None = None) -> str:
    """Move ``alias`` back to the version it pointed at before the last promotion."""
    client = _client(uri)
    key = f"alias_history.{alias}"
    history = _history(client.get_registered_model(name).tags.get(key, ""))
    if len(history) < 2:
        raise ValueError(
            f"{name}@{alias} has no earlier version to roll back to (history: {history})"
        )
    previous = history[-2]
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(name, key, ",".join(history[:-1]))
    return previous


@reaches_registry
def list_versions(name: str | None = None, uri: str | None = None) -> list[dict]:
    """One row per version: name, version, aliases, has_index, created, evaluation metrics;
    none from a sqlite store that does not exist (it is not created)."""
    import mlflow.tracking  # noqa: F401 - the extra this needs, named before the store is read

    from censusvi.registry.mlflow_store import absent_sqlite_store

    if absent_sqlite_store(uri) is not None:
        return []
    client = _client(uri)
    names = [name] if name else [m.name for m in _every(client.search_registered_models)]
    rows = []
    for n in names:
        for mv in sorted(_versions_of(client, n), key=lambda m: int(m.version)):
            rows.append(
                {
                    "name": n,
                    "version": str(mv.version),
                    "aliases": list(client.get_model_version(n, mv.version).aliases),
                    "has_index": mv.tags.get("has_index", "false"),
                    "metrics": version_metrics(n, mv.version, uri),
                }
            )
    return rows


def _every(search, filter_string: str | None = None) -> list:
    """Every page of an MLflow search (registered models come 100 to a page)."""
    found, token = [], None
    while True:
        page = search(filter_string=filter_string, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _versions_of(client, name: str) -> list:
    """The versions of ``name``. MLflow's filter has no escape: a name holding one kind of
    quote is quoted with the other ("bob's-model" broke the listing of the whole registry); one
    holding both is found among all versions."""
    for quote in ("'", '"'):
        if quote not in name:
            return _every(client.search_model_versions, f"name={quote}{name}{quote}")
    return [mv for mv in _every(client.search_model_versions) if mv.name == name]


def resolve_version(uri: str, tracking: str | None = None) -> str:
    """The version number a ``models:/`` URI points at now (an alias moves; a number does not)."""
    name, version, alias = parse_model_uri(uri)
    if version is not None:
        return version
    held = alias_holder(name, alias, tracking)
    if held is None:
        raise ValueError(
            f"{name}@{alias} is not set in {use_tracking(tracking)}: promote a version first "
            "(`censusvi models promote`)"
        )
    return held


@reaches_registry
def add_to_version(
    model_uri: str,
    metrics: dict[str, float],
    index_dir: str | os.PathLike | None = None,
    uri: str | None = None,
) -> tuple[str, str]:
    """Log evaluation metrics (and an index, as ``index/``) to the run behind a registered
    version, after the fact: what the promotion gate compares and what serving needs.
    Returns (name, version)."""
    from censusvi.registry.pyfunc import log_mlmodel

    name, _, _ = parse_model_uri(model_uri)
    version = resolve_version(model_uri, uri)
    client = _client(uri)
    run_id = client.get_model_version(name, version).run_id
    if index_dir is not None:
        _check_fits_version(name, version, index_dir, uri)
        log_folder(client, run_id, index_dir, "index")
        log_mlmodel(client, run_id, index_dir)  # the output schema: the index's label columns
        client.set_model_version_tag(name, version, "has_index", "true")
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    return name, version


def _check_fits_version(name: str, version: str, index_dir, uri: str | None) -> None:
    """An index attached to a registered version must load and hold that version's latents, as
    ``register`` checks (Serve trusts a registered version's index)."""
    import tempfile

    from censusvi.annotate.index import load_index
    from censusvi.annotate.index_checks import check_fits
    from censusvi.model.io import load_model

    meta = load_index(index_dir).meta
    with tempfile.TemporaryDirectory(prefix="censusvi-version-") as tmp:
        model_dir = fetch_version(name, version, tmp, uri, index=False).model_dir
        check_fits(load_model(model_dir), meta, f"the index in {index_dir}", f"{name}/{version}")


def fetch_version(
    name: str,
    version: str,
    dst: str | os.PathLike,
    uri: str | None = None,
    model: bool = True,
    index: bool = True,
) -> VersionFiles:
    """Download one version's model and its index (when it has one) under ``dst``, or only the
    part a caller reads: a replica that maps needs no index (gigabytes at Census scale) and one
    that searches needs no weights."""
    from censusvi.registry.fetch import artifact_names, download_model

    base = f"models:/{name}/{version}"
    names = artifact_names(base, uri)
    if "model" not in names:  # registered from a bare model directory: it is the whole version
        return VersionFiles(name, str(version), download_model(base, dst, uri), None)
    model_dir = download_model(f"{base}/model", dst, uri) if model else None
    index_dir = None
    if index and "index" in names:
        index_dir = download_model(f"{base}/index", dst, uri)
        if not (index_dir / "index.json").is_file():
            raise ValueError(f"{base}/index has no index.json: not an index `censusvi index` wrote")
    return VersionFiles(name, str(version), model_dir, index_dir)
