"""Which optional extra a command needs, said in one line instead of a traceback.

The core install (``pip install censusvi``) embeds, maps, annotates, indexes, runs DE and
imputation and pretrains on .h5ad files. Ray, Serve, MLflow, TileDB-SOMA/Census, scib-metrics and
the report's figures come with extras (pyproject.toml). A ``ModuleNotFoundError`` for a module one
of them installs, or raised while importing one of them (``ray`` without ``ray[serve]``'s web
stack), becomes ``MissingExtra``, which the CLI prints on one line and exits 2::

    censusvi serve needs the 'serve' extra: pip install 'censusvi[serve]' (no module named 'ray')
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator

# Module (or package prefix) -> the extra that installs it; the first match wins, so a more
# specific prefix comes before its package.
MODULE_EXTRAS: tuple[tuple[str, str], ...] = (
    ("ray.serve", "serve"),
    ("multipart", "serve"),
    ("python_multipart", "serve"),
    ("prometheus_client", "serve"),
    ("starlette", "serve"),
    ("fastapi", "serve"),
    ("uvicorn", "serve"),
    ("ray", "ray"),
    ("mlflow", "mlflow"),
    ("tiledbsoma", "census"),
    ("cellxgene_census", "census"),
    ("scib_metrics", "eval"),
    ("harmonypy", "eval"),
    ("scanpy", "eval"),
    ("umap", "report"),
    ("matplotlib", "report"),
)
# What `require` imports to check an extra up front (a job checks before it starts work).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "ray": ("ray", "ray.train", "ray.data"),
    "serve": ("ray", "ray.serve", "multipart", "prometheus_client"),
    "census": ("tiledbsoma", "cellxgene_census"),
    "mlflow": ("mlflow",),
    "eval": ("scib_metrics", "harmonypy", "scanpy"),
    "report": ("umap", "matplotlib"),
}
# Where plain Ray is not enough: `censusvi serve` needs ray[serve].
RAY_EXTRA = {"censusvi serve": "serve"}


class MissingExtra(ImportError):
    """A command needs an extra that is not installed; the message names it and the pip line."""

    def __init__(self, what: str, extra: str, module: str | None):
        missing = f" (no module named {module!r})" if module else ""
        super().__init__(
            f"{what} needs the {extra!r} extra: pip install 'censusvi[{extra}]'{missing}",
            name=module,
        )
        self.extra = extra


def extra_of(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted name), or None for anything else."""
    for prefix, extra in MODULE_EXTRAS:
        if module and (module == prefix or module.startswith(prefix + ".")):
            return extra
    return None


def missing_extra(error: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """``error`` as a ``MissingExtra`` for ``what`` (e.g. "censusvi serve"), or None when the
    missing module belongs to no extra (a broken install, a typo: keep its traceback).

    The missing module itself is looked up first; failing that, the innermost frame of the
    traceback that runs inside an extra's package (a dependency of that package is missing)."""
    extra = extra_of(error.name)
    if extra is None:
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_globals.get("__name__"))
            tb = tb.tb_next
        extra = next((e for e in map(extra_of, reversed(frames)) if e), None)
    if extra is None:
        return None
    if extra == "ray":
        extra = RAY_EXTRA.get(what, extra)
    return MissingExtra(what, extra, error.name)


_ENTRANCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("entrance", default=None)


@contextlib.contextmanager
def needs_extras(what: str) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` of an extra's module inside the block into ``MissingExtra``
    naming ``what`` (e.g. "censusvi models list"). Nested blocks leave it to the outermost, the
    entrance the user called (``censusvi report`` calls ``censusvi.report()``)."""
    if _ENTRANCE.get() is not None:
        yield
        return
    token = _ENTRANCE.set(what)
    try:
        yield
    except ModuleNotFoundError as e:
        missing = missing_extra(e, what)
        if missing is None:
            raise
        raise missing from e
    finally:
        _ENTRANCE.reset(token)


def require(extra: str, what: str) -> None:
    """Raise ``MissingExtra`` unless the modules of ``extra`` can be imported (checked without
    running them where possible: a submodule's parent package is imported)."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_MODULES)}")
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        except ValueError:  # sys.modules[module] is None: blocked on purpose (tests)
            found = False
        if not found:
            raise MissingExtra(what, extra, module)
