"""What an output may replace: the artifacts censusvi writes, recognised on disk.

An output replaces, unasked, only a censusvi artifact of the same kind (``DIR_KINDS``,
``MARKED_DIR_KINDS``, ``FILE_KINDS``), an empty file or an empty directory; anything else needs
``overwrite`` (``check_replaceable``), and a file output never replaces a folder. Writing them
is ``censusvi.atomic``'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from censusvi.untrusted import read_json_file

MARKER = ".censusvi"
"""JSON ``{"kind": ...}`` in a directory whose own files do not say censusvi wrote it."""

DIR_KINDS: dict[str, tuple[frozenset[str], str, Callable[[dict], bool]]] = {
    # kind: (exactly the entries censusvi writes, the JSON file that names it, its test)
    "model": (  # censusvi.model.io
        frozenset({"config.json", "weights.safetensors"}),
        "config.json",
        lambda d: d.get("format") == "censusvi-model",
    ),
    "index": (  # censusvi.annotate.index
        frozenset({"index.faiss", "labels.parquet", "index.json"}),
        "index.json",
        lambda d: "kind" in d and "label_keys" in d,
    ),
    "checkpoint": (  # censusvi.train.checkpoint
        frozenset({"weights.safetensors", "optimizer.pt", "state.json"}),
        "state.json",
        lambda d: "fingerprint" in d,
    ),
    "scvi-tools": (  # censusvi.model.scvi_tools_io: model.pt alone could be anyone's
        frozenset({"model.pt", MARKER}),
        MARKER,
        lambda d: d.get("kind") == "scvi-tools",
    ),
}
OPTIONAL_ENTRIES: dict[str, frozenset[str]] = {  # entries a kind may hold beside those above
    "index": frozenset({"heads.safetensors"}),  # the label heads (index --head, the default)
}
# Directories whose entries vary from run to run: MARKER ({"kind": kind}) says censusvi wrote
# one, and every other entry must be one it writes (a killed step's temporaries included).
_DEMO_ENTRY = (
    r"(?:reference\.soma|model|model\.checkpoint|demo_metrics\.json|.+\.(?:census|embedded)\.h5ad)"
)
MARKED_DIR_KINDS: dict[str, re.Pattern[str]] = {
    "demo": re.compile(rf"{_DEMO_ENTRY}|\.{_DEMO_ENTRY}\.(?:tmp|old)-[\w.-]+"),  # censusvi.demo
}
HTML_GENERATOR = '<meta name="generator" content="censusvi">'
DE_GENE, DE_GENE_ID = "gene", "gene_id"  # censusvi.generative.de: index (symbol), id column
DE_CSV_HEADERS = (f"{DE_GENE},{DE_GENE_ID},", "gene_id,gene_symbol,")  # now; older tables


def artifact_files(folder: str | os.PathLike, kind: str) -> tuple[list[Path], list[str]]:
    """(the files of a censusvi ``kind`` folder that make it up, the names of the other entries):
    what the registry uploads. Each must be a regular file in the folder: a link is refused, as
    registering would upload whatever it points at (a model directory someone handed over)."""
    entries, _, _ = DIR_KINDS[kind]
    allowed = entries | OPTIONAL_ENTRIES.get(kind, frozenset())
    files, other = [], []
    for path in sorted(Path(folder).iterdir()):
        if path.name not in allowed:
            other.append(path.name)
        elif path.is_symlink() or not path.is_file():
            what = "a link" if path.is_symlink() else "not a regular file"
            raise ValueError(
                f"{path} is {what}: a {kind}'s files must be plain files in its folder (the "
                "registry would upload what a link points at); copy the file itself there"
            )
        else:
            files.append(path)
    return files, other


class OutputRefused(ValueError):
    """An output would replace something censusvi did not write, or one of the run's inputs."""


def _h5ad_is_ours(path: Path) -> bool:
    """Every .h5ad censusvi writes has an ``uns["censusvi..."]`` entry (model, genes, report)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "uns" in f and any(k.startswith("censusvi") for k in f["uns"])
    except OSError:  # not HDF5
        return False


def _head(path: Path, n: int = 4096) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode("utf-8", errors="replace")


def _csv_is_ours(path: Path) -> bool:
    header = _head(path).split("\n", 1)[0]
    return header.startswith(DE_CSV_HEADERS) and ",comparison,group1,group2" in header


def _html_is_ours(path: Path) -> bool:
    head = _head(path)  # reports before the generator tag: their title
    return HTML_GENERATOR in head or "<title>censusvi mapping report" in head


FILE_KINDS: dict[str, Callable[[Path], bool]] = {
    ".h5ad": _h5ad_is_ours,
    ".csv": _csv_is_ours,
    ".html": _html_is_ours,
}


def artifact_kind(path: Path) -> str | None:
    """The kind of censusvi artifact at ``path`` ("model", ".h5ad", ...), or None."""
    if path.is_symlink():
        return None
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        for kind, (files, named_in, test) in DIR_KINDS.items():
            if files <= names <= files | OPTIONAL_ENTRIES.get(kind, frozenset()):
                try:
                    if test(read_json_file(path / named_in, named_in)):
                        return kind
                except (OSError, ValueError, AttributeError):
                    pass
        for kind, entry in MARKED_DIR_KINDS.items():
            if MARKER in names and all(n == MARKER or entry.fullmatch(n) for n in names):
                try:
                    if read_json_file(path / MARKER, MARKER).get("kind") == kind:
                        return kind
                except (OSError, ValueError, AttributeError):
                    pass
        return None
    for kind, test in FILE_KINDS.items():
        try:
            if path.is_file() and test(path):
                return kind
        except OSError:
            pass
    return None


def describe(path: Path) -> str:
    """What is at ``path``, in a few words."""
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        kind = artifact_kind(path)
        return f"a censusvi {kind} directory" if kind else f"a directory holding {shown}"
    if path.is_file():
        kind = artifact_kind(path)
        size = path.stat().st_size
        return (
            f"a censusvi {kind} file" if kind else f"a file of {size} bytes censusvi did not write"
        )
    return "neither a file nor a directory"


def is_dir_kind(kind: str) -> bool:
    return kind in DIR_KINDS or kind in MARKED_DIR_KINDS


def _replaceable(path: Path, kind: str) -> bool:
    if not os.path.lexists(path):
        return True
    if path.is_symlink():
        return False
    if is_dir_kind(kind) and path.is_dir() and not any(path.iterdir()):
        return True  # an empty directory: nothing to lose
    if kind in FILE_KINDS and path.is_file() and path.stat().st_size == 0:
        return True
    return artifact_kind(path) == kind


def check_replaceable(
    out: str | os.PathLike, kind: str, overwrite: bool = False, flag: str = "--out"
) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, a censusvi ``kind`` or ``overwrite``."""
    out = Path(out)
    if not out.is_symlink() and out.is_dir() and not is_dir_kind(kind) and any(out.iterdir()):
        raise OutputRefused(
            f"{out} exists and is {describe(out)}; a file output never replaces a folder, even "
            f"with --overwrite: choose another {flag}"
        )
    replaceable = _replaceable(out, kind)
    if is_dir_kind(kind) and not out.is_symlink() and out.exists() and not replaceable:
        if not out.is_dir():
            raise OutputRefused(
                f"{out} exists and is {describe(out)}; a folder output never replaces a file, "
                f"even with --overwrite: choose another {flag}"
            )
        if artifact_kind(out) is None:  # a user's folder: never deleted
            raise OutputRefused(
                f"{out} exists and is {describe(out)}; a {kind} folder replaces only what "
                f"censusvi wrote, even with --overwrite: choose another {flag} (or remove it "
                "yourself)"
            )
    if overwrite or replaceable:
        return
    what = f"a censusvi {kind} {'directory' if is_dir_kind(kind) else 'file'}"
    raise OutputRefused(
        f"{out} exists and is {describe(out)}, not {what}: pass --overwrite to replace it, "
        f"or choose another {flag}"
    )
