"""Reading checkpoints safely, and saying what is wrong with one that does not load.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a weights file from the
internet must never be able to run code. Every failure a user can cause (wrong file, truncated
download, checkpoint of another architecture) becomes a :class:`CheckpointError` whose message
names the cause and the file.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from napari_stm.core.errors import CheckpointError
from napari_stm.core.model import VOSNetwork

StateDict = dict[str, Tensor]

_STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict")
_SHOWN_KEYS = 3


def _what_is(path: Path) -> str:
    """Name what a file that is not a checkpoint looks like, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (fetch it with git lfs pull)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download link that returns a web page? Dropbox links need ?dl=1)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a PyTorch checkpoint (unrecognised header {head[:8].hex(' ')})"
    return "a text file"


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint safely and return its state_dict, without any ``module.`` prefix.

    Accepts a plain state_dict or a dict holding one under ``state_dict``, ``model`` or
    ``model_state_dict`` (training checkpoints).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises anything from KeyError to OSError on bad files
        raise CheckpointError(_diagnose_load_failure(path, e)) from None
    return _extract_state_dict(obj, path)


def _diagnose_load_failure(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    size = path.stat().st_size
    message = str(error)
    is_zip = magic == b"PK\x03\x04"  # torch.save's format since 1.6; its directory is at the end
    if is_zip and not zipfile.is_zipfile(path):
        return (
            f"checkpoint {path} is truncated ({size} bytes, the end of the archive is missing): "
            "an interrupted download or copy? Get the file again"
        )
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    # In a zip checkpoint the pickle is intact here, so the name is real; a cut legacy file can
    # end inside a name, so there it counts only if it names an object already imported.
    if refused and (is_zip or _imported_object(refused.group(1))):
        return (
            f"checkpoint {path} contains a pickled Python object ({refused.group(1)}) that safe "
            "loading (torch.load weights_only=True) refuses; if you trust the file, load it once "
            "and re-save only the weights: torch.save(model.state_dict(), 'weights.pth')"
        )
    if is_zip:
        return f"checkpoint {path} is corrupt: {type(error).__name__}: {_first_line(message)}"
    if magic[:1] == b"\x80":  # a pickle protocol header: torch's legacy format
        # This format has no directory to check, so a cut shows up as any unpickling error.
        if isinstance(error, EOFError) or "EOF" in message:
            kind = "truncated"
        else:
            kind = "truncated or corrupt"
        return (
            f"checkpoint {path} is {kind}, {size} bytes: an interrupted download or copy? "
            "Get the file again"
        )
    return f"{path} is not a PyTorch checkpoint: it is {_what_is(path)}"


def _imported_object(name: str) -> bool:
    """Whether ``name`` is an attribute path into an imported module (never imports anything)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:cut]))
        if obj is None:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return False
        return True
    return False


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"


def _extract_state_dict(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        # a training checkpoint: the weights sit under one entry, beside epoch, optimizer ...
        inner = next((obj[e] for e in _STATE_DICT_ENTRIES if isinstance(obj.get(e), Mapping)), None)
        if inner is None and obj:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise CheckpointError(
                f"checkpoint {path} holds no state_dict: a dict with keys [{keys}] and no "
                f"{' / '.join(_STATE_DICT_ENTRIES)} entry"
            )
        obj = obj if inner is None else inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)"
        )
    if not obj:
        raise CheckpointError(f"checkpoint {path} holds an empty state_dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"checkpoint {path} is not a state_dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
    state_dict = dict(obj)
    consume_prefix_in_state_dict_if_present(state_dict, "module.")
    return state_dict


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _shapes_fit(checkpoint: Tensor, model: Tensor) -> bool:
    # torch loads a [1] tensor into a 0-d one (checkpoints from torch < 0.4 store scalars so)
    if model.dim() == 0 and checkpoint.shape == (1,):
        return True
    return checkpoint.shape == model.shape


def _mismatch_summary(model_sd: Mapping[str, Tensor], ckpt: Mapping[str, Tensor]) -> str | None:
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints older than torch
    # 0.4.1 lack it), so strict loading accepts that and so do we.
    missing = [k for k in model_sd if k not in ckpt and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in ckpt if k not in model_sd]
    mismatched = [
        f"{k}: checkpoint {_shape(ckpt[k])}, model {_shape(v)}"
        for k, v in model_sd.items()
        if k in ckpt and not _shapes_fit(ckpt[k], v)
    ]
    parts = []
    if missing:
        noun = "key" if len(missing) == 1 else "keys"
        parts.append(f"missing {len(missing)} {noun} ({_listed(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({_listed(unexpected)})")
    if mismatched:
        noun = "mismatch" if len(mismatched) == 1 else "mismatches"
        shown = "; ".join(mismatched[:_SHOWN_KEYS]) + ("; ..." if len(mismatched) > 3 else "")
        parts.append(f"{len(mismatched)} shape {noun} ({shown})")
    if not parts:
        return None
    summary = ", ".join(parts)
    if not any(k in model_sd for k in ckpt):
        summary += "; no key in common: is it a checkpoint for another model?"
    return summary


def load_state_dict(model: VOSNetwork, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``; a mismatch is summarised, not dumped."""
    summary = _mismatch_summary(model.state_dict(), state_dict)
    label = model.name or type(model).__name__
    if summary:
        raise CheckpointError(f"checkpoint {source} does not fit model {label!r}: {summary}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {source} does not fit model {label!r}: {_first_line(str(e))}"
        ) from None
