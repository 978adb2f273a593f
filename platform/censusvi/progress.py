"""One progress bar for every long command: on an interactive terminal, off with ``--quiet`` or in
a non-interactive log (CI, ``ray job`` logs, pipelines), where bars only add noise."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

QUIET = False  # set by the command line's --quiet


def bar(
    iterable=None, total: int | None = None, desc: str = "", unit: str = "cell", quiet: bool = False
) -> tqdm:
    disable = QUIET or quiet or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False)
