"""censusvi: pretrain scVI on Census-scale single-cell corpora, map queries onto it, serve it.

The package root stays import-light (the model core runs where only torch, numpy and scipy are
installed); the user-facing functions below are imported on first use. ``censusvi.api`` holds
the notebook API: pretrain, finetune, embed, build_index, annotate, map_query, de, impute, report.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        (
            "pretrain",
            "finetune",
            "embed",
            "build_index",
            "annotate",
            "map_query",
            "de",
            "impute",
            "report",
        ),
        "censusvi.api",
    ),
    "load_model": "censusvi.model.io",
    "save_model": "censusvi.model.io",
    "load_index": "censusvi.annotate.index",
    "get_latent_representation": "censusvi.inference",
    "get_normalized_expression": "censusvi.inference",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'censusvi' has no attribute {name!r}")
