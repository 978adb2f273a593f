"""The names a registered model is addressed by: ``models:/NAME/VERSION`` and
``models:/NAME@ALIAS``. Checked here, before MLflow is asked: MLflow 3 reads ``models:/m1`` as a
logged model's id and answers "Logged model with ID 'm1' not found"."""

from __future__ import annotations

FORMS = "models:/NAME/VERSION or models:/NAME@ALIAS"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> (name, version, alias); the version
    or alias may go on with ``/SUBPATH`` (one folder of it)."""
    rest = uri.removeprefix("models:/") if isinstance(uri, str) else ""
    name, at, alias = rest.partition("@")
    if not at:
        name, _, version = rest.partition("/")
    if rest == uri or not name or not (alias if at else version).split("/")[0]:
        raise ValueError(f"{uri!r} is not {FORMS}: e.g. models:/censusvi-scvi/1")
    return (name, None, alias) if at else (name, version, None)


def check_model_name(name: str) -> None:
    """A registered model's name that ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` can
    address: not empty, no '/' nor '@' (MLflow registered 'a@b', which no URI could then name)."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"model name {name!r}: give a name without leading or trailing spaces")
    bad = sorted({c for c in name if c in "/@"})
    if bad:
        raise ValueError(
            f"model name {name!r} holds {bad}: models:/NAME/VERSION and models:/NAME@ALIAS could "
            "not address it; choose a name without them (e.g. censusvi-scvi)"
        )
