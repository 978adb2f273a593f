"""Config files of ``censusvi pretrain`` and ``python -m censusvi.jobs.pretrain``: one loader.

``--config`` is a packaged config by name (``census``, ``demo``, ``local``, ``small``: the YAML
files in ``censusvi/configs/``, shipped in the wheel) or a path to a YAML file. A name is a word
with no ``/`` and no ``.yaml``/``.yml`` suffix; anything else is a path. ``--set KEY=VALUE`` then
sets any key, top-level (``out=/data/model``) or in a section (``train.max_epochs=2``); VALUE is
read as YAML (``2`` an int, ``null`` None, ``[a, b]`` a list).

Paths (``data.source``, ``data.ingest``, ``out``, ``storage``): a relative path written in a
config file is relative to that file's folder; absolute paths and URIs (``census://``,
``s3://``, ``models:/``) are kept as written. A relative path given with ``--set`` is relative to the current directory,
as on any command line; in a ``ray job submit --working-dir`` job that is Ray's unpacked copy of
the folder, so give absolute paths there. Packaged configs are recipes (architecture, schedule,
Ray settings): they hold no relative path (a test checks), so the data and the run's output are
always the user's to set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from censusvi.typed import shown

MAX_VALUES = 10_000  # values a config document may expand to (check_size)

PACKAGED = Path(__file__).resolve().with_name("configs")
# The keys a config document may hold at the top level.
TOP_LEVEL = ("data", "model", "train", "stream", "out", "storage", "mlflow")
SECTIONS = ("data", "model", "train", "stream", "mlflow")
# (section, key) of every path; a section of None is a top-level key.
PATH_KEYS = (("data", "source"), ("data", "ingest"), (None, "out"), (None, "storage"))


class ConfigError(ValueError):
    """A config that cannot be read or does not fit the schema (the message is one line)."""


def packaged_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def is_name(spec: str) -> bool:
    """``local`` is a packaged config's name; ``./local``, ``local.yaml``, ``a/b`` are paths."""
    return not any(sep in spec for sep in ("/", os.sep)) and not spec.endswith((".yaml", ".yml"))


def locate(spec: str | os.PathLike) -> Path:
    """The YAML file ``spec`` names: a packaged config by name, else the path (which must exist)."""
    spec = os.fspath(spec)
    if is_name(spec):
        path = PACKAGED / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"--config {spec}: no packaged config of that name; packaged: "
                f"{', '.join(packaged_names())}, or give the path to a YAML file"
            )
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        raise ConfigError(
            f"--config {spec} is a folder: give the YAML file itself"
            + (f" (it holds {', '.join(yamls)})" if yamls else "")
        )
    if not path.is_file():
        raise ConfigError(f"--config {spec}: no such file")
    return path


def is_uri(value: str) -> bool:
    return "://" in value or value.startswith("models:/")


def resolve_path(value: str, base: Path | None) -> str:
    """``value`` against ``base`` (a config file's folder; None: the current directory)."""
    if is_uri(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base or Path.cwd()) / path)


def _path_value(value: Any, base: Path | None, where: str, name: str) -> Any:
    """A path key's value, resolved: a path or URI, or for ``ingest`` glob patterns (one or a list)."""
    if value is None:
        return None
    if name.endswith("ingest"):
        patterns = [value] if isinstance(value, str) else value
        if isinstance(patterns, list) and all(isinstance(v, str) for v in patterns):
            return [resolve_path(v, base) for v in patterns]
        raise ConfigError(
            f"{where}: {name} must be a glob pattern or a list of them, got {shown(value)}"
        )
    if isinstance(value, str):
        return resolve_path(value, base)
    raise ConfigError(f"{where}: {name} must be a path or URI (a string), got {shown(value)}")


def _resolve_paths(doc: dict[str, Any], base: Path, where: str) -> None:
    for section, key in PATH_KEYS:
        node = doc if section is None else doc.get(section)
        if isinstance(node, dict) and key in node:
            name = key if section is None else f"{section}.{key}"
            node[key] = _path_value(node[key], base, where, name)


def check_size(doc: Any, where: str, limit: int = MAX_VALUES) -> None:
    """Refuse a document that expands to more than ``limit`` values. YAML's aliases let a few
    hundred bytes name 10^8 values (a list of ten copies of a list of ten copies...); loading
    shares them, but printing or saving the settings expands them all. The walk stops at the
    limit."""
    stack, seen = [doc], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError(
                f"{where}: the settings expand to more than {limit:,} values (YAML aliases "
                "repeating one another?); a config holds a few dozen: write them out"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def _check_schema(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{where}: expected a mapping of {', '.join(TOP_LEVEL)}, got a {type(doc).__name__}"
        )
    unknown = sorted(set(doc) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(TOP_LEVEL)}")
    for section in SECTIONS:
        if doc.get(section) is not None and not isinstance(doc[section], dict):
            raise ConfigError(f"{where}: {section} must be a mapping, got {shown(doc[section])}")
    return doc


def read_file(path: Path) -> dict[str, Any]:
    """The YAML document at ``path``, checked, its relative paths made relative to its folder."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    check_size(doc, str(path))
    doc = _check_schema(doc, str(path))
    _resolve_paths(doc, path.absolute().parent, str(path))
    return doc


def apply_set(doc: dict[str, Any], item: str) -> None:
    """One ``--set KEY=VALUE`` (KEY top-level or ``section.key``); a path is cwd-relative."""
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or not all(parts) or len(parts) > 2:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE or SECTION.KEY=VALUE, e.g. out=/data/model "
            "or train.max_epochs=2"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {item!r}: VALUE is not valid YAML: {' '.join(str(e).split())}"
        ) from e
    check_size(value, f"--set {item!r}")
    if parts[0] not in TOP_LEVEL:
        raise ConfigError(
            f"--set {item!r}: unknown key {parts[0]!r}; known: {', '.join(TOP_LEVEL)}"
        )
    section, key = (None, parts[0]) if len(parts) == 1 else parts
    if (section, key) in PATH_KEYS:
        if not isinstance(value, str | list | None):  # out=2024 is a path, not a number
            value = text
        value = _path_value(value, None, f"--set {item!r}", key)
    if section is None:
        update = {key: value}
    elif section in SECTIONS:
        update = {section: {**(doc.get(section) or {}), key: value}}
    else:
        raise ConfigError(
            f"--set {item!r}: {section} is a value, not a section: --set {section}=VALUE"
        )
    _check_schema({**doc, **update}, f"--set {item!r}")
    doc.update(update)


def read_config(spec: str | os.PathLike | None, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """The config ``spec`` names (None: an empty one) with ``sets`` applied in order."""
    doc = read_file(locate(spec)) if spec else {}
    for item in sets:
        apply_set(doc, item)
    return doc
