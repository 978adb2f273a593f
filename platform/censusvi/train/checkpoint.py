"""Per-epoch training checkpoints: weights (safetensors), optimizer state, and a JSON state.

A checkpoint carries a fingerprint of the run (data, genes, batches, configuration); resuming with
a different one is refused, since silently continuing another run's weights is worse than starting
over. Each save is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from censusvi.atomic import atomic_directory
from censusvi.model.vae import VAE


class CheckpointStore:
    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples to lists

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def save(self, vae: VAE, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        with atomic_directory(self.path, "checkpoint") as tmp:
            weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors and numbers only
            (tmp / "state.json").write_text(json.dumps({"fingerprint": self.fingerprint, **state}))

    def load(self, vae: VAE, opt: torch.optim.Optimizer) -> dict[str, Any]:
        state = json.loads((self.path / "state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            diff = sorted(
                k
                for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                if self.fingerprint.get(k) != state.get("fingerprint", {}).get(k)
            )
            raise ValueError(
                f"checkpoint {self.path} belongs to a different run (differs in {diff}); "
                "delete it to start over, or rerun with the original settings to resume"
            )
        device = next(vae.parameters()).device
        vae.load_state_dict(load_file(str(self.path / "weights.safetensors"), device=str(device)))
        opt.load_state_dict(
            torch.load(self.path / "optimizer.pt", weights_only=True, map_location=device)
        )
        return state

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
