"""Which device a model runs on: CUDA when there is one, and a clear error for one that is not."""

from __future__ import annotations

import torch

from napari_stm.core.errors import InputError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a requested device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {str(device)!r} was requested but CUDA is not available here "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"device {str(device)!r} was requested but only {count} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(
            f"device {str(device)!r} was requested but Apple MPS is not available here; "
            "use device='cpu'"
        )
    return dev
