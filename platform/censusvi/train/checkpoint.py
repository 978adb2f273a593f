"""Per-epoch training checkpoints: weights (safetensors), optimizer state, and a JSON state.

A checkpoint carries a fingerprint of the run (data, genes, batches, configuration); resuming with
a different one is refused, since silently continuing another run's weights is worse than starting
over. The data are identified by ``source_identity``: a rewritten source file is another run's
data even when its cells and genes look the same. Each save is written under a temporary name and
renamed. ``censusvi pretrain`` and every Ray worker save and resume through this one store
(``censusvi.train.loop.save_to`` and ``resume_from``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from censusvi.atomic import atomic_directory
from censusvi.model.vae import VAE
from censusvi.untrusted import read_json_file


def source_identity(source) -> dict[str, Any]:
    """What identifies the cells a run reads: the source's URI (a local path resolved); for a
    file its size and mtime; a hash of the selected cells' ids (obs names of an .h5ad, the
    soma_joinids of a SOMA experiment or the Census)."""
    uri = str(source.uri)
    ident: dict[str, Any] = {"uri": uri}
    path = Path(uri)
    if "://" not in uri and path.exists():
        ident["uri"] = str(path.resolve())
        if path.is_file():
            st = path.stat()
            ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    n = len(source.obs)
    ids = source.joinids(np.arange(n)) if hasattr(source, "joinids") else source.obs.index
    hashed = pd.util.hash_pandas_object(pd.Index(ids), index=False).to_numpy()  # (n,) uint64
    ident["cells_sha1"] = hashlib.sha1(hashed.tobytes()).hexdigest()
    return ident


SHOWN_AS = {"uri": "source", "size": "size", "mtime_ns": "modified", "cells_sha1": "cells"}


def _shown(key: str, value: Any) -> str:
    if key == "mtime_ns" and isinstance(value, int):
        return datetime.fromtimestamp(value / 1e9).isoformat(sep=" ", timespec="seconds")
    if key == "cells_sha1" and isinstance(value, str):
        return value[:8]
    return str(value)


def _no_memory(e: BaseException) -> bool:
    """Out of (GPU) memory while loading is not a damaged file: it passes on as it is."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError))


class CheckpointStore:
    """One run's checkpoint at ``path``; ``start_over``: how to start afresh, for the refusal
    (None: delete ``path``, or ``--no-resume``, as ``censusvi pretrain``)."""

    def __init__(
        self, path: str | os.PathLike, fingerprint: dict[str, Any], start_over: str | None = None
    ) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples to lists
        self.start_over = start_over

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def save(self, vae: VAE, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        with atomic_directory(self.path, "checkpoint") as tmp:
            weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors and numbers only
            (tmp / "state.json").write_text(json.dumps({"fingerprint": self.fingerprint, **state}))

    def read_state(self) -> dict[str, Any]:
        """The checkpoint's JSON state as written (no weights loaded, no fingerprint check)."""
        try:
            state = read_json_file(self.path / "state.json", "the checkpoint's state")
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
            raise self.damaged("state.json", e) from None
        if not isinstance(state, dict) or not isinstance(state.get("history", {}), dict):
            raise self.damaged("state.json", TypeError("not the JSON object a run writes"))
        return state

    def load(self, vae: VAE, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
        """The JSON state, with the weights loaded into ``vae`` and the optimiser state into
        ``opt`` (None: weights only); ValueError when the checkpoint is another run's or one of
        its files is damaged (an interrupted copy, a full disk)."""
        state = self.read_state()
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(self.refusal(state.get("fingerprint", {})))
        device = next(vae.parameters()).device
        try:
            vae.load_state_dict(load_file(str(self.path / "weights.safetensors"), str(device)))
        except Exception as e:  # safetensors' header errors, missing or misshapen tensors
            if _no_memory(e):
                raise
            raise self.damaged("weights.safetensors", e) from None
        if opt is not None:
            try:  # weights_only: tensors and numbers, never an object's code
                saved = torch.load(
                    self.path / "optimizer.pt", weights_only=True, map_location=device
                )
                opt.load_state_dict(saved)
            except Exception as e:
                if _no_memory(e):
                    raise
                raise self.damaged("optimizer.pt", e) from None
        return state

    def damaged(self, name: str, e: Exception) -> Exception:
        """A file of the checkpoint cannot be read back: which, why, and how to start afresh
        (a file the OS will not give, e.g. no permission, is said as such: it may be fine)."""
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            return OSError(f"cannot read checkpoint file {self.path / name} ({why})")
        return ValueError(
            f"checkpoint {self.path} is damaged ({name}: {why}); {self.fresh()}, or restore it"
        )

    def fresh(self) -> str:
        return self.start_over or (
            f"delete {self.path} to start over (or pass --no-resume: no checkpoints)"
        )

    def refusal(self, theirs: dict[str, Any]) -> str:
        """Why the checkpoint's fingerprint ``theirs`` is not this run's, and what to do."""
        fresh = self.fresh()
        ours = self.fingerprint
        then, now = theirs.get("data"), ours.get("data")
        if isinstance(then, dict) and isinstance(now, dict) and then != now:
            changed = ", ".join(
                f"{name} {_shown(k, then.get(k))} -> {_shown(k, now.get(k))}"
                for k, name in SHOWN_AS.items()
                if then.get(k) != now.get(k)
            )
            return (
                f"the source {now.get('uri')} changed since checkpoint {self.path} was written "
                f"({changed}): {fresh}"
            )
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        return (
            f"checkpoint {self.path} belongs to a different run (differs in {diff}); {fresh}, "
            "or rerun with the original settings to resume"
        )

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
