"""Named models, checkpoint loading, and weight downloads (cache + sha256).

``load_model(name, weights)`` is the only entry point adapters need: it looks the name up in the
registry (``registry.py``), picks the device (``device.py``), fetches a URL into the cache
(``download.py``) and reads and checks the checkpoint (``checkpoint.py``). Every failure a user
can cause (wrong file, truncated download, checkpoint of another architecture, bad URL, hash
mismatch) becomes a :class:`CheckpointError` whose message names the cause and the file or URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.model import VOSNetwork
from napari_stm.core.weights.checkpoint import StateDict, load_state_dict, read_state_dict
from napari_stm.core.weights.device import resolve_device
from napari_stm.core.weights.download import (
    DOWNLOAD_TIMEOUT,
    cache_dir,
    cache_path,
    check_sha256_format,
    download,
    is_url,
    sha256_of,
)
from napari_stm.core.weights.registry import (
    _REGISTRY,  # noqa: F401  (tests save and restore the registry through it)
    DEFAULT_MODEL,
    MICROSCOPY_MODEL,
    OFFICIAL_STM_WEIGHTS_URL,
    ModelSpec,
    available_models,
    default_model_name,
    get_spec,
    looks_like_microscopy,
    register,
    unregister,
)

__all__ = [
    "DEFAULT_MODEL",
    "DOWNLOAD_TIMEOUT",
    "MICROSCOPY_MODEL",
    "OFFICIAL_STM_WEIGHTS_URL",
    "ModelSpec",
    "StateDict",
    "available_models",
    "cache_dir",
    "cache_path",
    "default_model_name",
    "download",
    "get_spec",
    "load_model",
    "load_state_dict",
    "looks_like_microscopy",
    "read_state_dict",
    "register",
    "resolve_device",
    "unregister",
]

#: the ``napari_stm`` package: relative default weights paths are inside it
_PACKAGE_DIR = Path(__file__).resolve().parents[2]


def _resolve_weights(
    spec: ModelSpec,
    weights: str | os.PathLike | None,
    sha256: str | None,
    progress: bool,
) -> tuple[Path, str, bool] | None:
    """The local checkpoint file, how to name it in messages, whether it is a cached download."""
    if weights is None:
        if spec.weights is None:
            if spec.weights_required:
                source = f", e.g. {spec.weights_source}" if spec.weights_source else ""
                raise CheckpointError(
                    f"model {spec.name!r} needs weights: pass weights=PATH or URL of its "
                    f"checkpoint{source}. Weights are never downloaded implicitly."
                )
            return None
        weights, sha256 = spec.weights, spec.sha256
        if not is_url(weights) and not Path(weights).is_absolute():
            weights = _PACKAGE_DIR / weights
    text = os.fspath(weights)
    if is_url(text):
        path = download(text, sha256=sha256, progress=progress)
        return path, f"{path} (downloaded from {text.partition('#')[0]})", True
    if "://" in text:
        raise InputError(f"unsupported URL scheme in {text!r}: use http(s) or a local path")
    path = Path(text).expanduser()
    if sha256 is not None:
        check_sha256_format(sha256)
        if path.is_file():
            got = sha256_of(path)
            if got != sha256.lower():
                raise CheckpointError(
                    f"sha256 mismatch for {path}: expected {sha256.lower()}, got {got}"
                )
    return path, str(path), False


def load_model(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> VOSNetwork:
    """Build the registered model ``name``, load its weights, return it frozen in eval mode.

    ``weights``: a checkpoint path or http(s) URL (downloaded once into :func:`cache_dir`,
    checked against ``sha256`` or a ``#sha256=<hex>`` fragment when given); None uses the
    model's default weights, and fails for a model that has none but needs them.
    ``device``: None picks CUDA when available, else CPU.
    """
    spec = get_spec(name)
    dev = resolve_device(device)
    resolved = _resolve_weights(spec, weights, sha256, progress)
    # Read the checkpoint before building the network: a bad file fails in milliseconds.
    state_dict = None
    if resolved is not None:
        path, source, cached = resolved
        try:
            state_dict = read_state_dict(path)
        except CheckpointError as e:
            if not cached:
                raise
            raise CheckpointError(
                f"{e} [{source}; delete the cached file to download it again]"
            ) from None
        if spec.key_map is not None:
            state_dict = spec.key_map(state_dict)
    model = spec.build()
    if spec.object_side is not None:
        model.object_side = spec.object_side
    if spec.working_side is not None:
        model.working_side = spec.working_side
    if state_dict is not None:
        load_state_dict(model, state_dict, source)
    model.eval().requires_grad_(False)
    return model.to(dev)
