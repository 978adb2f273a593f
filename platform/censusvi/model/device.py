"""Which torch device a command may run on, checked before any work."""

from __future__ import annotations

import torch


def device_kind(device: str) -> str:
    """``device``'s kind (cpu, cuda, ...), or a ValueError for a string torch does not read."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: give cpu, cuda or cuda:N") from None


def check_local_device(device: str) -> None:
    """Before any work: ``device`` exists on this machine (a CUDA one without a CUDA build of
    torch, or without a GPU, failed after the data were read, in torch's traceback)."""
    kind = device_kind(device)
    if kind == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA build" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ValueError(f"device {device!r}: this machine's torch {build}; use cpu")
    index, gpus = torch.device(device).index, torch.cuda.device_count()
    if kind == "cuda" and index is not None and index >= gpus:
        raise ValueError(
            f"device {device!r}: this machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1} "
            f"(index {index} is past them)"
        )
    if kind not in ("cpu", "cuda") and not _available(kind):
        raise ValueError(f"device {device!r}: torch cannot use {kind} here; use cpu or cuda")


def _available(kind: str) -> bool:
    backend = getattr(torch.backends, kind, None) or getattr(torch, kind, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())
