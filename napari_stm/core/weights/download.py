"""Weights from http(s) URLs: downloaded once into a cache, pinned by sha256, never half-written."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

#: seconds a socket may stay silent before a download is abandoned
DOWNLOAD_TIMEOUT = 60.0
_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


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
        check_sha256_format(pin)
    return base, pin


def check_sha256_format(value: str) -> None:
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


def sha256_of(path: Path) -> str:
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
        got = sha256_of(dest)
        if got == pin:
            return dest
        logger.warning("cached %s has sha256 %s, expected %s: downloading again", dest, got, pin)
        dest.unlink()
    _fetch(url, dest, pin, progress)
    return dest


def _fetch(url: str, dest: Path, pin: str | None, progress: bool) -> None:
    # Written beside the destination and renamed in one step (atomic_path), so an interrupted
    # or failed download never leaves a file the cache would later mistake for a checkpoint.
    from tqdm.auto import tqdm

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the weights cache folder {dest.parent}: {e}") from e
    request = urllib.request.Request(url, headers={"User-Agent": "napari-stm"})
    digest = hashlib.sha256()
    received = 0
    logger.info("downloading %s to %s", url, dest)
    try:
        with (
            atomic_path(dest) as tmp,
            urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response,
        ):
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with (
                open(tmp, "wb") as f,
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
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise CheckpointError(f"cannot download {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise CheckpointError(
            f"download of {url} to {dest} failed: {type(e).__name__}: {e}"
        ) from None
