"""``--obs-filter`` (``data.obs_filter``) on an .h5ad: obs columns compared with numbers, quoted
strings, True/False or lists of them, joined by and / or / not (``&``, ``|`` and ``~`` as pandas
reads them), e.g. ``is_primary_data == True and nnz >= 300`` -- what a SOMA value filter says.

The text is parsed and walked here, never executed. pandas' ``DataFrame.eval`` resolved
``@name`` to the caller's variables, so ``@os.system('...')`` ran a shell command. (A SOMA
source's filter goes to tiledbsoma's own parser, which runs no code either.)"""

from __future__ import annotations

import ast
import io
import tokenize
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
_JOIN = {ast.And: np.logical_and, ast.Or: np.logical_or}
_LITERALS = (str, int, float, bool)
MAX_CHARS = 10_000


def _refuse(text: str, what: str) -> ValueError:
    return ValueError(f"obs filter {shown(text)}: {what}; {HOW}")


def _scalar(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, _LITERALS)
    return (  # -1, +2.5
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, (ast.USub, ast.UAdd))
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
        and not isinstance(node.operand.value, bool)
    )


def _listed(node: ast.AST) -> bool:
    return isinstance(node, (ast.List, ast.Tuple)) and all(_scalar(e) for e in node.elts)


def _check_compare(node: ast.Compare, text: str, columns: set[str] | None) -> None:
    for op, right in zip(node.ops, node.comparators):
        if isinstance(op, (ast.In, ast.NotIn)) and not _listed(right):
            raise _refuse(text, "'in' takes a [list] of numbers or quoted strings")
        if type(op) not in _COMPARE and not isinstance(op, (ast.In, ast.NotIn)):
            raise _refuse(text, f"{type(op).__name__} is not a comparison it allows")
    for side in (node.left, *node.comparators):
        if isinstance(side, ast.Name):
            if columns is not None and side.id not in columns:
                raise _refuse(text, f"{side.id!r} is not an obs column (it has {sorted(columns)})")
        elif not (_scalar(side) or _listed(side)):
            raise _refuse(text, f"{shown(ast.unparse(side))} is neither a column nor a literal")


def _check(node: ast.AST, text: str, columns: set[str] | None) -> None:
    if isinstance(node, ast.BoolOp):
        for part in node.values:
            _check(part, text, columns)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
        _check(node.operand, text, columns)
    elif isinstance(node, ast.Compare):
        _check_compare(node, text, columns)
    elif isinstance(node, ast.Name):  # a boolean column on its own
        if columns is not None and node.id not in columns:
            raise _refuse(text, f"{node.id!r} is not an obs column (it has {sorted(columns)})")
    else:
        raise _refuse(text, f"{shown(ast.unparse(node))} is not a comparison of obs columns")


def _as_pandas_reads(text: str) -> str:
    """``&`` and ``|`` as ``and`` and ``or``, as pandas' query rewrites them before parsing:
    ``a == 1 & b > 2`` means both comparisons (Python would bind ``1 & b`` first)."""
    tokens = [
        (tokenize.NAME, {"&": "and", "|": "or"}[t.string])
        if t.type == tokenize.OP and t.string in ("&", "|")
        else (t.type, t.string)
        for t in tokenize.generate_tokens(io.StringIO(text).readline)
    ]
    return tokenize.untokenize(tokens)


def checked(text: str, columns: Iterable[str] | None = None) -> ast.expr:
    """``text`` parsed and checked against the grammar (and against ``columns`` when given);
    a ValueError in one line otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise _refuse(str(text), "it is empty")
    if len(text) > MAX_CHARS:
        raise _refuse(text, f"it is {len(text):,} characters (at most {MAX_CHARS:,})")
    try:
        tree = ast.parse(_as_pandas_reads(text.strip()), mode="eval")
        _check(tree.body, text, None if columns is None else set(map(str, columns)))
    except SyntaxError as e:
        raise _refuse(text, f"it does not parse ({e.msg})") from None
    except tokenize.TokenError as e:
        raise _refuse(text, f"it does not parse ({e.args[0]})") from None
    except (RecursionError, MemoryError):
        raise _refuse(text, "it nests too deeply") from None
    return tree.body


def _value(node: ast.AST, obs: pd.DataFrame):
    if isinstance(node, ast.Name):
        return obs[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, obs) for e in node.elts]
    if isinstance(node, ast.UnaryOp):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    return node.value


def _compare(node: ast.Compare, obs: pd.DataFrame) -> np.ndarray:
    out = np.ones(len(obs), dtype=bool)
    left = _value(node.left, obs)
    for op, right_node in zip(node.ops, node.comparators):
        right = _value(right_node, obs)
        if isinstance(right, list):  # in, not in; == and != with a list, as pandas reads them
            hit = np.asarray(pd.Series(left, index=obs.index).isin(right), dtype=bool)
            step = hit if isinstance(op, (ast.In, ast.Eq)) else ~hit
        else:
            step = getattr(pd.Series(left, index=obs.index), _COMPARE[type(op)])(right)
            step = np.asarray(step, dtype=bool)
        out &= step
        left = right
    return out


def _mask(node: ast.AST, obs: pd.DataFrame) -> np.ndarray:
    if isinstance(node, ast.BoolOp):
        join = _JOIN[type(node.op)]
        out = _mask(node.values[0], obs)
        for part in node.values[1:]:
            out = join(out, _mask(part, obs))
        return out
    if isinstance(node, ast.UnaryOp):
        return ~_mask(node.operand, obs)
    if isinstance(node, ast.Name):
        return np.asarray(obs[node.id], dtype=bool)
    return _compare(node, obs)


def mask(obs: pd.DataFrame, text: str) -> np.ndarray:
    """Which rows of ``obs`` pass ``text``: a boolean array, from the checked tree alone."""
    tree = checked(text, obs.columns)
    try:
        return _mask(tree, obs)
    except (TypeError, ValueError) as e:
        raise _refuse(text, f"it cannot be evaluated on obs ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise _refuse(text, "it nests too deeply") from None
