"""Named models, checkpoint loading, and weight downloads (cache + sha256).

``load_model(name, weights)`` is the only entry point adapters need. Checkpoints are always read
with ``torch.load(..., weights_only=True)``: a weights file from the internet must never be able
to run code. Every failure a user can cause (wrong file, truncated download, checkpoint of another
architecture, bad URL, hash mismatch) becomes a :class:`CheckpointError` whose message names the
cause and the file or URL.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.model import VOSNetwork

__all__ = [
    "ModelSpec",
    "available_models",
    "cache_dir",
    "cache_path",
    "download",
    "get_spec",
    "load_model",
    "load_state_dict",
    "read_state_dict",
    "register",
    "resolve_device",
    "unregister",
]

logger = logging.getLogger(__name__)

#: seconds a socket may stay silent before a download is abandoned
DOWNLOAD_TIMEOUT = 60.0
_CHUNK = 1 << 20
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict")
_SHOWN_KEYS = 3

StateDict = dict[str, Tensor]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model and where its weights come from.

    ``factory`` is ``"module:Class"`` (imported only when the model is built, so listing the
    registry imports no network code) or any zero-argument callable returning a
    :class:`VOSNetwork`. ``weights`` is the default checkpoint: None, a path (relative paths are
    inside the ``napari_stm`` package) or an http(s) URL, pinned by ``sha256``.
    ``weights_source`` tells users where to get weights when they are required but not given.
    ``key_map`` turns a checkpoint in a foreign layout into this model's parameter names; it runs
    after a DataParallel ``module.`` prefix has been stripped.
    """

    name: str
    factory: str | Callable[[], VOSNetwork]
    description: str
    weights: str | None = None
    sha256: str | None = None
    weights_required: bool = False
    weights_source: str | None = None
    key_map: Callable[[StateDict], StateDict] | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"model name must be a non-empty word, got {self.name!r}")
        if isinstance(self.factory, str) and self.factory.count(":") != 1:
            raise ValueError(
                f"model {self.name!r}: factory must be 'module:Class', got {self.factory!r}"
            )
        if self.sha256 is not None:
            _check_sha256_format(self.sha256)

    def build(self) -> VOSNetwork:
        """Construct the network (randomly initialised unless its constructor loads weights)."""
        factory = self.factory
        if isinstance(factory, str):
            module_name, attr = factory.split(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(
                    f"model {self.name!r}: cannot import its factory {self.factory!r}: {e}"
                ) from e
        model = factory()
        if not isinstance(model, VOSNetwork):
            raise TypeError(
                f"model {self.name!r}: factory {self.factory!r} returned "
                f"{type(model).__name__}, not a VOSNetwork"
            )
        model.name = self.name
        return model


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a named model. Re-registering a name needs ``replace=True``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> ModelSpec:
    """Remove a named model and return its spec."""
    spec = get_spec(name)
    del _REGISTRY[name]
    return spec


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(_REGISTRY) or "none"
        raise CheckpointError(f"unknown model {name!r}; available models: {names}") from None


#: the model every adapter uses when none is named: trained by us and bundled, so it works
#: offline the moment the package is installed
DEFAULT_MODEL = "stm-lite"


def default_model_name() -> str:
    """The model adapters use when none is named (the bundled ``stm-lite``)."""
    return DEFAULT_MODEL if DEFAULT_MODEL in _REGISTRY else next(iter(_REGISTRY))


def available_models() -> dict[str, str]:
    """Registered model names and their one-line descriptions, in registration order."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


# --------------------------------------------------------------------------- devices


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


# --------------------------------------------------------------------------- download + cache


def cache_dir() -> Path:
    """``$NAPARI_STM_CACHE``, else ``<torch hub dir>/checkpoints/napari-stm``."""
    env = os.environ.get("NAPARI_STM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / "napari-stm"


def _split_pin(url: str, sha256: str | None) -> tuple[str, str | None]:
    """Remove a ``#sha256=<hex>`` fragment; reconcile it with the ``sha256`` argument."""
    base, _, fragment = url.partition("#")
    pin = sha256.lower() if sha256 else None
    if fragment:
        match = re.fullmatch(r"sha256=([0-9a-fA-F]+)", fragment)
        if match is None:
            raise InputError(f"unsupported URL fragment #{fragment} in {url} (only #sha256=<hex>)")
        frag_pin = match.group(1).lower()
        if pin is not None and pin != frag_pin:
            raise InputError(
                f"two different sha256 pins for {base}: sha256={pin} and the URL's "
                f"#sha256={frag_pin}"
            )
        pin = frag_pin
    if pin is not None:
        _check_sha256_format(pin)
    return base, pin


def _check_sha256_format(value: str) -> None:
    if not _SHA256_RE.fullmatch(value.lower()):
        raise InputError(f"sha256 must be 64 hex digits, got {value!r}")


def cache_path(url: str) -> Path:
    """Where ``url`` is cached: its basename plus a short hash of the whole URL.

    The hash keeps two URLs with the same basename (e.g. ``.../v1/model.pth`` and
    ``.../v2/model.pth``) apart; the fragment is not part of it, so adding a pin reuses the file.
    """
    base = url.partition("#")[0]
    basename = urllib.parse.unquote(Path(urllib.parse.urlsplit(base).path).name)
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename).lstrip(".") or "weights"
    stem, dot, suffix = basename.rpartition(".")
    if not dot or not stem:
        stem, suffix = basename, "pth"
    tag = hashlib.sha256(base.encode()).hexdigest()[:10]
    return cache_dir() / f"{stem}-{tag}.{suffix}"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` into the cache (once) and return the local path.

    A pin (``sha256`` or a ``#sha256=<hex>`` URL fragment) is checked on the download and again
    whenever the cached file is reused; a cached file that no longer matches is fetched again.
    """
    url, pin = _split_pin(url, sha256)
    dest = cache_path(url)
    if dest.is_file():
        if pin is None:
            return dest
        got = _sha256_of(dest)
        if got == pin:
            return dest
        logger.warning("cached %s has sha256 %s, expected %s: downloading again", dest, got, pin)
        dest.unlink()
    _fetch(url, dest, pin, progress)
    return dest


def _fetch(url: str, dest: Path, pin: str | None, progress: bool) -> None:
    # Written beside the destination and renamed in one step, so an interrupted or failed
    # download never leaves a file the cache would later mistake for a complete checkpoint.
    from tqdm.auto import tqdm

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the weights cache folder {dest.parent}: {e}") from e
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "napari-stm"})
    digest = hashlib.sha256()
    received = 0
    logger.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with (
                open(tmp, "xb") as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise CheckpointError(
                f"download of {url} was cut short: got {received} of {total} bytes; try again"
            )
        got = digest.hexdigest()
        if pin is not None and got != pin:
            raise CheckpointError(
                f"sha256 mismatch for {url}: expected {pin}, got {got}; the download was "
                f"discarded (nothing kept in {dest.parent})"
            )
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise CheckpointError(f"cannot download {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise CheckpointError(
            f"download of {url} to {dest} failed: {type(e).__name__}: {e}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading checkpoints


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


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


# --------------------------------------------------------------------------- loading into a model


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
        if not _is_url(weights) and not Path(weights).is_absolute():
            weights = _PACKAGE_DIR / weights
    text = os.fspath(weights)
    if _is_url(text):
        path = download(text, sha256=sha256, progress=progress)
        return path, f"{path} (downloaded from {text.partition('#')[0]})", True
    if "://" in text:
        raise InputError(f"unsupported URL scheme in {text!r}: use http(s) or a local path")
    path = Path(text).expanduser()
    if sha256 is not None:
        _check_sha256_format(sha256)
        if path.is_file():
            got = _sha256_of(path)
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
    if state_dict is not None:
        load_state_dict(model, state_dict, source)
    model.eval().requires_grad_(False)
    return model.to(dev)


# --------------------------------------------------------------------------- the models

OFFICIAL_STM_WEIGHTS_URL = "https://www.dropbox.com/s/mtfxdr93xc3q55i/STM_weights.pth?dl=1"

register(
    ModelSpec(
        name="stm-resnet50",
        factory="napari_stm.core.network:STM",
        description="STM (Oh et al., ICCV 2019), ResNet-50 encoders; loads the official "
        "STM_weights.pth",
        weights_required=True,
        weights_source=(
            "the official STM_weights.pth by the STM authors, licensed CC BY-NC-SA 4.0 "
            f"(non-commercial): {OFFICIAL_STM_WEIGHTS_URL}"
        ),
    )
)
register(
    ModelSpec(
        name="stm-lite",
        factory="napari_stm.core.stm_lite:STMLite",
        description="STM on an ImageNet EfficientNet-Lite0, trained by us (docs/model_card.md); "
        "bundled, the default; works at 512 pixels a side unless --max-side says otherwise; "
        "weights for non-commercial research use",
        weights="weights/stm_lite.pth",
        sha256="c478ad84843370379406636a80669b471e3d358c965bde98efd6bd235b6a7968",
    )
)
register(
    ModelSpec(
        name="lite0-match",
        factory="napari_stm.core.lite0_match:Lite0Match",
        description="ImageNet EfficientNet-Lite0 features matched across frames; needs no "
        "trained weights",
    )
)
