"""One rule for a setting's type, wherever settings come from: a config file (YAML reads
anything: "two", [1], "maybe"), a ``--set`` item, ``serve run``'s ``key=value`` strings, or the
Python API. ``typed`` returns the value (converted where the text spells the type) or raises a
ValueError naming the setting and what it should have been."""

from __future__ import annotations

import reprlib
import types
import typing
from numbers import Real
from typing import Any

from censusvi.numeric import check_seed, is_finite, is_whole

_SHORT = reprlib.Repr()  # at most 6 items of a list, 4 of a dict (Python 3.11: no arguments)
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 200, 200
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def shown(value: Any, limit: int = 40) -> str:
    """``value``'s repr for an error line, cut at ``limit`` characters (a request or a config
    may hold megabytes where a name was meant). ``reprlib`` never spells out more than a few
    items per level, so a value nested deep (YAML aliases) is not expanded to be cut."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kinds(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _from_text(value: str, kinds: tuple) -> Any:
    """``value`` as the first of ``kinds`` it spells (YAML 1.1 reads ``1e-3`` as text; ``serve
    run`` passes every value as text); the text itself where it spells none."""
    for kind in kinds:
        if kind is bool and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind in (int, float):
            if not value.isascii() or "_" in value:  # int() also reads "１５" and "1_5" as 15
                continue
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def _is(value, kind) -> bool:
    if kind is int:
        return is_whole(value)
    if kind is float:
        return isinstance(value, Real) and not isinstance(value, bool)
    if kind in (bool, str):
        return isinstance(value, kind)
    if typing.get_origin(kind) is tuple:  # tuple[str, ...], tuple[int, ...]
        item = typing.get_args(kind)[0]
        return isinstance(value, tuple) and all(_is(v, item) for v in value)
    return isinstance(value, kind)


def _named(kind) -> str:
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is int:
        return "a list of whole numbers"
    return _KINDS.get(kind, "a list of names")


def typed(name: str, value: Any, hint: Any, text: bool = False) -> Any:
    """``value`` for a setting typed ``hint`` (``int``, ``float | None``, ``tuple[str, ...]``,
    ...). A string is read as a number where ``hint`` has one, and as anything when ``text``
    (every value of ``serve run key=value`` is a string)."""
    kinds = _kinds(hint)
    if value is None and type(None) in kinds:
        return None
    if isinstance(value, str) and str not in kinds and (text or float in kinds):
        value = _from_text(value, kinds)
    if any(_is(value, kind) for kind in kinds if kind is not type(None)):
        return value
    named = [_named(k) for k in kinds if k is not type(None)]
    none = " (or null)" if type(None) in kinds else ""
    raise ValueError(f"{name}={shown(value, 60)}: must be {' or '.join(named)}{none}")


def _positive(v) -> bool:
    return is_finite(v) and v > 0


def _non_negative(v) -> bool:
    return is_finite(v) and v >= 0


# The range of each optimiser setting that pretraining, surgery and fine-tuning share: one rule,
# one wording (test, what it must be)
RANGES = {
    "max_epochs": (lambda v: is_whole(v) and v >= 1, "whole epochs >= 1"),
    "batch_size": (
        lambda v: is_whole(v) and v >= 3,
        "a whole number of cells >= 3 (batch normalisation needs them)",
    ),
    "lr": (_positive, "a finite number > 0"),
    "weight_decay": (_non_negative, "a finite number >= 0"),
    "adam_eps": (_positive, "a finite number > 0"),
    "min_delta": (_non_negative, "a finite number >= 0"),
    "patience": (lambda v: is_whole(v) and v >= 1, "whole epochs >= 1"),
    "n_epochs_kl_warmup": (lambda v: is_whole(v) and v >= 0, "whole epochs >= 0"),
    "classification_ratio": (_positive, "a finite number > 0 (scANVI uses 50)"),
}


def check_ranges(settings: Any, names: tuple[str, ...], unset: tuple[str, ...] = ()) -> None:
    """A ValueError ``NAME=VALUE: must be ...`` for the first of ``names`` whose value on
    ``settings`` breaks its ``RANGES`` rule; those in ``unset`` may be None (a schedule's or a
    default's to fill), and a ``seed`` is checked too where ``settings`` has one."""
    for name in names:
        value = getattr(settings, name)
        ok, rule = RANGES[name]
        if not (value is None and name in unset) and not ok(value):
            raise ValueError(f"{name}={shown(value, 60)}: must be {rule}")
    if hasattr(settings, "seed"):
        check_seed(settings.seed)
