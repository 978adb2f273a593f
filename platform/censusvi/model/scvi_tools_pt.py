"""scvi-tools' ``model.pt`` read without scvi-tools or pickle's code execution.

scvi-tools saves ``{"model_state_dict", "var_names", "attr_dict"}`` with ``torch.save``. It is read
here with ``torch.load(weights_only=True)``: only tensors, plain containers and an allowlist are
rebuilt. numpy arrays (var names, category lists) are allowlisted; the pandas objects scvi-tools
keeps in ``history_`` are replaced by inert stand-ins that run no pandas code; anything else makes
the load fail with the name of the type that was refused.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FILE = "model.pt"
# torch names a refused type in one of two ways: a global to look up, or a type to build.
_REFUSED = re.compile(  # torch's words for a global it will not load without an allowlist
    r"Unsupported global: GLOBAL ([\w.]+)|but got <class '([\w.]+)'>"
    r"|unsupported GLOBAL ([\w.]+) whose module [\w.]+ is blocked"
)


class _Inert:
    """Stand-in for a pandas object in ``history_``: accepts any construction, holds nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert(*args: Any, **kwargs: Any) -> _Inert:
    """Stand-in for a pandas rebuild function."""
    return _Inert()


def _plain_dict(*_: Any) -> dict:
    return {}


def _real_global(name: str) -> Any | None:
    """Allowlisted real objects: numpy's array/scalar rebuilders and plain containers."""
    numpy_names = {
        "_reconstruct": np._core.multiarray._reconstruct,
        "scalar": np._core.multiarray.scalar,
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }
    if "." not in name:
        name = f"builtins.{name}"
    module, _, attr = name.rpartition(".")
    if (
        module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
        and attr in numpy_names
    ):
        return numpy_names[attr]
    if module == "numpy.dtypes" and attr.endswith("DType"):
        return getattr(np.dtypes, attr, None)
    # torch fills only plain dicts, so a defaultdict (scvi-tools' field registry) becomes one.
    plain: dict[str, Any] = {
        "collections.defaultdict": _plain_dict,
        "collections.OrderedDict": collections.OrderedDict,
    }
    plain.update(
        {
            f"builtins.{t.__name__}": t
            for t in (
                dict,
                list,
                tuple,
                set,
                frozenset,
                slice,
                str,
                bytes,
                bytearray,
                int,
                float,
                complex,
                bool,
            )
        }
    )
    return plain.get(name)


def read_model_pt(path: str | os.PathLike) -> dict[str, Any]:
    """``model.pt`` of an scvi-tools directory, loaded without executing pickled code."""
    path = Path(path)
    f = path / MODEL_FILE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {MODEL_FILE} (an scvi-tools model directory has one)")
    allowed: list[Any] = []
    for _ in range(200):
        try:
            with torch.serialization.safe_globals(allowed):
                d = torch.load(f, weights_only=True, map_location="cpu")
            odd = d if not isinstance(d, dict) else d.get("attr_dict", {})
            if not isinstance(odd, dict):
                what = "its attr_dict is" if isinstance(d, dict) else "it holds"
                raise ValueError(
                    f"{f}: {what} a {type(odd).__name__}, not the dict scvi-tools saves (of "
                    "model_state_dict, var_names and attr_dict): give a directory scvi-tools saved"
                )
            return d
        except pickle.UnpicklingError as e:
            m = _REFUSED.search(str(e))
            if m is None:  # not a pickle at all (torch's own text advises unsafe loading)
                raise ValueError(
                    f"cannot read {f} as an scvi-tools {MODEL_FILE}: it is not a file PyTorch "
                    "loads without running code; give a directory scvi-tools saved"
                ) from None
            name = next(g for g in m.groups() if g)
            if any(a == name or (isinstance(a, tuple) and a[1] == name) for a in allowed):
                raise ValueError(f"cannot read {f}: {name} is allowlisted but still refused") from e
            real = _real_global(name)
            if real is not None:
                allowed.append(real)
                if "." in name:  # also under the name the file uses (older numpy module paths)
                    allowed.append((real, name))
            elif name.startswith("pandas."):
                is_class = name.rpartition(".")[2][:1].isupper()
                stand_in = _Inert if is_class else _inert
                allowed.append((stand_in, name))
            else:
                raise ValueError(
                    f"{f} needs {name} to load: that is neither a tensor, a plain container nor an "
                    "allowlisted type, and censusvi does not run pickled code. Load it in scvi-tools "
                    "and re-save it, or export its weights to safetensors."
                ) from e
        except (RuntimeError, EOFError, OSError, IndexError, KeyError, TypeError) as e:
            raise ValueError(  # torch's loader raises these on text or a damaged archive
                f"cannot read {f} ({type(e).__name__}: {e}); the file is truncated or not a "
                "torch file"
            ) from e
    raise ValueError(f"{f}: too many distinct types to allowlist; refusing to load it")
