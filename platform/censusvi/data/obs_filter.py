"""One grammar for ``--obs-filter`` (``data.obs_filter``) on every source: obs columns compared
with numbers, quoted strings, True/False or lists of them, joined by and / or / not -- the SOMA
value-filter language, e.g. ``is_primary_data == True and nnz >= 300``.

The text is parsed and walked here, never executed. pandas' ``DataFrame.eval`` resolves
``@name`` to the caller's variables, so ``@os.system('...')`` ran a shell command; a SOMA filter
goes to tiledbsoma's own parser after the same check, so one filter reads alike on both."""

from __future__ import annotations

import ast
from collections.abc import Iterable

import numpy as np
import pandas as pd

from censusvi.typed import shown

HOW = (
    "write obs columns compared with numbers, quoted strings, True/False or [lists], "
    'joined by and/or/not, e.g. "is_primary_data == True and nnz >= 300"'
)
_COMPARE = {
    ast.Eq: "__eq__",
    ast.NotEq: "__ne__",
    ast.Lt: "__lt__",
    ast.LtE: "__le__",
    ast.Gt: "__gt__",
    ast.GtE: "__ge__",
}
_JOIN = {
    ast.And: np.logical_and,
    ast.Or: np.logical_or,
    ast.BitAnd: np.logical_and,
    ast.BitOr: np.logical_or,
}
_LITERALS = (str, int, float, bool)
MAX_CHARS = 10_000


def _refuse(text: str, what: str) -> ValueError:
    return ValueError(f"obs filter {shown(text)}: {what}; {HOW}")


def _literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, _LITERALS)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return (
            isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)
        )
    return isinstance(node, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, _LITERALS) for e in node.elts
    )


def _check(node: ast.AST, text: str, columns: set[str] | None) -> None:
    if isinstance(node, ast.BoolOp) or (isinstance(node, ast.BinOp) and type(node.op) in _JOIN):
        for part in node.values if isinstance(node, ast.BoolOp) else (node.left, node.right):
            _check(part, text, columns)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
        _check(node.operand, text, columns)
    elif isinstance(node, ast.Compare):
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.List, ast.Tuple)) or not _literal(right):
                    raise _refuse(text, "'in' takes a [list] of numbers or quoted strings")
            elif type(op) not in _COMPARE:
                raise _refuse(text, f"{type(op).__name__} is not a comparison it allows")
        for side in (node.left, *node.comparators):
            if not (_literal(side) or isinstance(side, ast.Name)):
                raise _refuse(text, f"{shown(ast.unparse(side))} is neither a column nor a literal")
            if isinstance(side, ast.Name) and columns is not None and side.id not in columns:
                raise _refuse(text, f"{side.id!r} is not an obs column (it has {sorted(columns)})")
    elif isinstance(node, ast.Name) and (columns is None or node.id in columns):
        return  # a boolean column on its own
    else:
        raise _refuse(text, f"{shown(ast.unparse(node))} is not a comparison of obs columns")


def checked(text: str, columns: Iterable[str] | None = None) -> ast.expr:
    """``text`` parsed and checked against the grammar (and against ``columns`` when given);
    a ValueError in one line otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise _refuse(str(text), "it is empty")
    if len(text) > MAX_CHARS:
        raise _refuse(text, f"it is {len(text):,} characters (at most {MAX_CHARS:,})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise _refuse(text, f"it does not parse ({e.msg})") from None
    _check(tree.body, text, None if columns is None else set(map(str, columns)))
    return tree.body


def _value(node: ast.AST, obs: pd.DataFrame):
    if isinstance(node, ast.Name):
        return obs[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [e.value for e in node.elts]
    if isinstance(node, ast.UnaryOp):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    return node.value


def _mask(node: ast.AST, obs: pd.DataFrame) -> np.ndarray:
    if isinstance(node, (ast.BoolOp, ast.BinOp)):
        parts = node.values if isinstance(node, ast.BoolOp) else (node.left, node.right)
        join = _JOIN[type(node.op)]
        out = _mask(parts[0], obs)
        for part in parts[1:]:
            out = join(out, _mask(part, obs))
        return out
    if isinstance(node, ast.UnaryOp):
        return ~_mask(node.operand, obs)
    if isinstance(node, ast.Name):
        return np.asarray(obs[node.id], dtype=bool)
    out = np.ones(len(obs), dtype=bool)
    left = _value(node.left, obs)
    for op, right_node in zip(node.ops, node.comparators):
        right = _value(right_node, obs)
        if isinstance(op, (ast.In, ast.NotIn)):
            hit = np.asarray(pd.Series(left, index=obs.index).isin(right), dtype=bool)
            step = hit if isinstance(op, ast.In) else ~hit
        else:
            step = getattr(pd.Series(left, index=obs.index), _COMPARE[type(op)])(right)
            step = np.asarray(step, dtype=bool)
        out &= step
        left = right
    return out


def mask(obs: pd.DataFrame, text: str) -> np.ndarray:
    """Which rows of ``obs`` pass ``text``: a boolean array, from the checked tree alone."""
    tree = checked(text, obs.columns)
    try:
        return _mask(tree, obs)
    except (TypeError, ValueError) as e:
        raise _refuse(text, f"it cannot be evaluated on obs ({str(e).splitlines()[0]})") from None
