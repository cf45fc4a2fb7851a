"""Model registry, checkpoint loading and weight downloads.

Most tests use a tiny test-only network registered for the test, so no ResNet-50 is built; the
download tests talk to an http.server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from official_reference import REFERENCE as OFFICIAL
from official_reference import load_make_weights
from torch import nn

from napari_stm.core import weights as W
from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.model import VOSNetwork


class TinyNet(VOSNetwork):
    def __init__(self) -> None:
        super().__init__()
        self.Key = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pred = nn.Conv2d(4, 2, 1)


class OtherNet(VOSNetwork):
    """Another architecture: some keys shared with TinyNet, one of them with another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.Key = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)


class NotANetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(1, 1)


@pytest.fixture
def tiny():
    """Register test-only models; restore the registry afterwards."""
    saved = dict(W._REGISTRY)
    W.register(W.ModelSpec("tiny", TinyNet, "tiny test net", weights_required=True))
    W.register(W.ModelSpec("tiny-noweights", TinyNet, "tiny test net, random weights"))
    yield "tiny"
    W._REGISTRY.clear()
    W._REGISTRY.update(saved)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
        net.bn.running_mean.uniform_(-1, 1)
    return net.state_dict()


def save(obj: object, path: Path, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def assert_same_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(got[key].cpu(), value), key


# --------------------------------------------------------------------------- registry


def test_builtin_models_listed_with_descriptions():
    models = W.available_models()
    assert {"stm-resnet50", "lite0-match"} <= models.keys()
    assert all(isinstance(d, str) and d and "\n" not in d for d in models.values())
    assert W.get_spec("stm-resnet50").weights_required
    assert W.get_spec("stm-resnet50").factory == "napari_stm.core.network:STM"
    assert not W.get_spec("lite0-match").weights_required


def test_unknown_model_lists_available_names():
    with pytest.raises(CheckpointError, match="unknown model 'stm-resnet51'") as info:
        W.load_model("stm-resnet51")
    assert "stm-resnet50" in str(info.value) and "lite0-match" in str(info.value)


def test_register_unregister(tiny):
    assert "tiny" in W.available_models()
    with pytest.raises(ValueError, match="already registered"):
        W.register(W.ModelSpec("tiny", OtherNet, "again"))
    W.register(W.ModelSpec("tiny", OtherNet, "again"), replace=True)
    assert W.get_spec("tiny").description == "again"
    W.unregister("tiny")
    assert "tiny" not in W.available_models()
    with pytest.raises(ValueError, match="module:Class"):
        W.ModelSpec("bad", "napari_stm.core.network.STM", "no colon")


def test_factory_import_error_and_type_checked(tiny):
    W.register(W.ModelSpec("ghost", "napari_stm.core.no_such_module:Net", "missing module"))
    with pytest.raises(ImportError, match="model 'ghost': cannot import"):
        W.load_model("ghost", device="cpu")
    W.register(W.ModelSpec("plain", NotANetwork, "plain module"))
    with pytest.raises(TypeError, match="not a VOSNetwork"):
        W.load_model("plain", device="cpu")


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "layout", ["plain", "module-prefix", "state_dict-entry", "model-entry", "legacy-format"]
)
def test_checkpoint_layouts_load_exactly(tiny, tmp_path, layout):
    sd = tiny_state_dict()
    ckpt = {
        "plain": sd,
        "module-prefix": {f"module.{k}": v for k, v in sd.items()},
        "state_dict-entry": {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        "model-entry": {"model": {f"module.{k}": v for k, v in sd.items()}, "step": 10},
        "legacy-format": sd,
    }[layout]
    kwargs = {"_use_new_zipfile_serialization": False} if layout == "legacy-format" else {}
    path = save(ckpt, tmp_path / "w.pth", **kwargs)

    model = W.load_model("tiny", weights=path, device="cpu", progress=False)

    assert isinstance(model, TinyNet) and model.name == "tiny"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.device == torch.device("cpu")
    assert_same_weights(model, sd)
    # eval mode matters: BatchNorm must use the loaded running statistics
    x = torch.rand(1, 3, 8, 8)
    expected = torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x, sd["Key.weight"], sd["Key.bias"]),
        sd["bn.running_mean"],
        sd["bn.running_var"],
        sd["bn.weight"],
        sd["bn.bias"],
    )
    torch.testing.assert_close(model.bn(model.Key(x)), expected)


def test_weights_as_str_path_and_missing_num_batches_tracked(tiny, tmp_path):
    sd = tiny_state_dict()
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = save(old, tmp_path / "old.pth")
    model = W.load_model("tiny", weights=str(path), device="cpu")
    assert torch.equal(model.bn.running_var, sd["bn.running_var"])


def test_old_style_one_element_scalars_load(tiny, tmp_path):
    # torch < 0.4 stored 0-d buffers as [1]; load_state_dict accepts that, so must the check
    sd = tiny_state_dict()
    sd["bn.num_batches_tracked"] = torch.tensor([7])
    model = W.load_model("tiny", weights=save(sd, tmp_path / "w.pth"), device="cpu")
    assert model.bn.num_batches_tracked.shape == () and int(model.bn.num_batches_tracked) == 7


def test_key_map_translates_foreign_layout(tiny, tmp_path):
    def from_foreign(sd):
        return {k.replace("encoder.key.", "Key."): v for k, v in sd.items()}

    W.register(W.ModelSpec("tiny-foreign", TinyNet, "foreign layout", key_map=from_foreign))
    sd = tiny_state_dict()
    foreign = {k.replace("Key.", "encoder.key."): v for k, v in sd.items()}
    path = save({f"module.{k}": v for k, v in foreign.items()}, tmp_path / "f.pth")
    assert_same_weights(W.load_model("tiny-foreign", weights=path, device="cpu"), sd)


def test_no_weights_needed(tiny):
    model = W.load_model("tiny-noweights", device="cpu")
    assert isinstance(model, TinyNet) and not model.training


def test_required_weights_missing_names_the_official_source():
    with pytest.raises(CheckpointError, match="'stm-resnet50' needs weights") as info:
        W.load_model("stm-resnet50", device="cpu")
    message = str(info.value)
    assert W.OFFICIAL_STM_WEIGHTS_URL in message
    assert "Weights are never downloaded implicitly" in message


def test_default_weights_inside_package(tiny, tmp_path, monkeypatch):
    sd = tiny_state_dict(seed=3)
    (tmp_path / "pkg").mkdir()
    path = save(sd, tmp_path / "pkg" / "tiny.pth")
    monkeypatch.setattr(W, "_PACKAGE_DIR", tmp_path)
    W.register(W.ModelSpec("tiny-default", TinyNet, "default weights", weights="pkg/tiny.pth"))
    assert_same_weights(W.load_model("tiny-default", device="cpu"), sd)
    path.unlink()
    with pytest.raises(CheckpointError, match="checkpoint not found: .*pkg/tiny.pth"):
        W.load_model("tiny-default", device="cpu")


def test_local_sha256_checked_without_touching_the_file(tiny, tmp_path):
    path = save(tiny_state_dict(), tmp_path / "w.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    W.load_model("tiny", weights=path, device="cpu", sha256=digest.upper())
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for .*w.pth: expected {'0' * 64}"):
        W.load_model("tiny", weights=path, device="cpu", sha256="0" * 64)
    assert path.exists()
    with pytest.raises(InputError, match="64 hex digits"):
        W.load_model("tiny", weights=path, device="cpu", sha256="abc")


# --------------------------------------------------------------------------- bad files


def test_missing_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        W.load_model("tiny", weights=tmp_path / "nope.pth", device="cpu")
    with pytest.raises(CheckpointError, match="not a file"):
        W.load_model("tiny", weights=tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"hello world\nthese are not weights\n", "a text file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "a PNG image"),
        (b"<!DOCTYPE html><html><body>Dropbox</body></html>", "an HTML page"),
        (b"\x00\x01\xfe\xff" * 8, "unrecognised header"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "a Git LFS pointer"),
        (b"", "is empty"),
    ],
)
def test_not_a_checkpoint(tiny, tmp_path, content, what):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=what) as info:
        W.load_model("tiny", weights=path, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tiny, tmp_path, legacy):
    path = save(tiny_state_dict(), tmp_path / "w.pth", _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pth is truncated"):
        W.load_model("tiny", weights=path, device="cpu")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2, 3], "holds a list, not a state_dict"),
        ({"epoch": 3, "optimizer": {"lr": 0.1}}, r"no state_dict: a dict with keys \[epoch"),
        ({}, "empty state_dict"),
        ({"Key.weight": torch.zeros(1), "note": "text"}, "entry 'note' is a str"),
    ],
)
def test_not_a_state_dict(tiny, tmp_path, obj, message):
    path = save(obj, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=message):
        W.load_model("tiny", weights=path, device="cpu")


def test_pickled_objects_are_refused(tiny, tmp_path):
    path = save(TinyNet(), tmp_path / "whole_model.pth")
    with pytest.raises(CheckpointError, match=r"pickled Python object \(.*TinyNet\)") as info:
        W.load_model("tiny", weights=path, device="cpu")
    assert "weights_only=True" in str(info.value)


def test_wrong_architecture_summary(tiny, tmp_path):
    path = save(OtherNet().state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as info:
        W.load_model("tiny", weights=path, device="cpu")
    message = str(info.value)
    assert f"checkpoint {path} does not fit model 'tiny'" in message
    # TinyNet's bn (4 tensors; num_batches_tracked may be absent) and pred are missing
    assert "missing 6 keys (bn.weight, bn.bias, bn.running_mean, ...)" in message
    assert "unexpected 2 (head.weight, head.bias)" in message
    assert "2 shape mismatches (Key.weight: checkpoint 8x3x3x3, model 4x3x3x3; " in message
    assert "Key.bias: checkpoint 8, model 4)" in message


def test_unrelated_checkpoint_hint(tiny, tmp_path):
    path = save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pth")
    with pytest.raises(CheckpointError, match="no key in common"):
        W.load_model("tiny", weights=path, device="cpu")


# --------------------------------------------------------------------------- devices


def test_device_default_and_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert W.resolve_device(None) == torch.device("cpu")
    assert W.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'cuda' was requested but CUDA is not available"):
        W.load_model("stm-resnet50", device="cuda")
    with pytest.raises(InputError, match="'mps' was requested but Apple MPS is not available"):
        W.resolve_device("mps")
    with pytest.raises(InputError, match="invalid device 'gpu0'"):
        W.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert W.resolve_device(None) == torch.device("cuda")
    with pytest.raises(InputError, match="'cuda:1' was requested but only 1 CUDA device"):
        W.resolve_device("cuda:1")


# --------------------------------------------------------------------------- downloads


class _Server:
    """Serves ``files`` (URL path -> bytes) and records every request path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()  # paths whose response claims more bytes than it sends
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self.send_response(HTTPStatus.OK)
                extra = 1000 if self.path in server.short else 0
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)
                if extra:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours proxy variables; requests to 127.0.0.1 must not leave the machine."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_STM_CACHE", str(folder))
    return folder


def checkpoint_bytes(tmp_path: Path, seed: int = 0) -> tuple[bytes, dict[str, torch.Tensor]]:
    sd = tiny_state_dict(seed)
    data = save(sd, tmp_path / f"src{seed}.pth").read_bytes()
    return data, sd


def test_download_then_reuse_cache(tiny, server, cache, tmp_path, capsys):
    data, sd = checkpoint_bytes(tmp_path)
    server.files["/v1/tiny.pth"] = data
    url = server.url("/v1/tiny.pth")

    model = W.load_model("tiny", weights=url, device="cpu", progress=True)
    assert_same_weights(model, sd)
    assert server.requests == ["/v1/tiny.pth"]
    assert "tiny-" in capsys.readouterr().err  # the tqdm bar is labelled with the file name
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("tiny-") and cached[0].suffix == ".pth"
    assert cached[0] == W.cache_path(url) and cached[0].read_bytes() == data

    model = W.load_model("tiny", weights=url, device="cpu", progress=False)
    assert_same_weights(model, sd)
    assert server.requests == ["/v1/tiny.pth"]  # no second request


def test_same_basename_different_urls_do_not_collide(tiny, server, cache, tmp_path):
    (a, sd_a), (b, sd_b) = checkpoint_bytes(tmp_path, 1), checkpoint_bytes(tmp_path, 2)
    server.files.update({"/a/w.pth": a, "/b/w.pth": b, "/b/w.pth?dl=1": b})
    assert_same_weights(W.load_model("tiny", weights=server.url("/a/w.pth"), progress=False), sd_a)
    assert_same_weights(W.load_model("tiny", weights=server.url("/b/w.pth"), progress=False), sd_b)
    W.download(server.url("/b/w.pth?dl=1"), progress=False)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and all(n.startswith("w-") and n.endswith(".pth") for n in names)


def test_sha256_pin_argument_and_fragment(tiny, server, cache, tmp_path):
    data, sd = checkpoint_bytes(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    server.files["/w.pth"] = data
    url = server.url("/w.pth")
    assert_same_weights(W.load_model("tiny", weights=url, sha256=digest, progress=False), sd)
    assert_same_weights(W.load_model("tiny", weights=f"{url}#sha256={digest}", progress=False), sd)
    assert server.requests == ["/w.pth"]  # the fragment is not part of the cache identity
    with pytest.raises(InputError, match="two different sha256 pins"):
        W.download(f"{url}#sha256={digest}", sha256="1" * 64)


def test_sha256_mismatch_keeps_nothing(tiny, server, cache, tmp_path):
    data, _ = checkpoint_bytes(tmp_path)
    server.files["/w.pth"] = data
    url = server.url("/w.pth")
    wrong = "ab" * 32
    with pytest.raises(CheckpointError) as info:
        W.load_model("tiny", weights=url, sha256=wrong, progress=False)
    message = str(info.value)
    assert message.startswith(f"sha256 mismatch for {url}: expected {wrong}, got ")
    assert hashlib.sha256(data).hexdigest() in message
    assert list(cache.iterdir()) == []


def test_cached_file_reverified_when_pinned(tiny, server, cache, tmp_path):
    data, sd = checkpoint_bytes(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    server.files["/w.pth"] = data
    url = server.url("/w.pth")
    path = W.download(url, progress=False)
    path.write_bytes(b"tampered")
    # unpinned: the cached file is trusted as it is, and its error says how to refresh it
    with pytest.raises(CheckpointError, match="delete the cached file to download it again"):
        W.load_model("tiny", weights=url, progress=False)
    # pinned: the bad cached file is noticed and fetched again
    assert_same_weights(W.load_model("tiny", weights=url, sha256=digest, progress=False), sd)
    assert server.requests == ["/w.pth", "/w.pth"]
    assert path.read_bytes() == data


def test_default_weights_url_with_pin(tiny, server, cache, tmp_path):
    data, sd = checkpoint_bytes(tmp_path, seed=5)
    server.files["/tiny.pth"] = data
    digest = hashlib.sha256(data).hexdigest()
    url = server.url("/tiny.pth")
    W.register(W.ModelSpec("tiny-url", TinyNet, "URL default", weights=url, sha256=digest))
    assert_same_weights(W.load_model("tiny-url", device="cpu", progress=False), sd)
    W.register(
        W.ModelSpec("tiny-url", TinyNet, "bad pin", weights=url, sha256="0" * 64), replace=True
    )
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        W.load_model("tiny-url", device="cpu", progress=False)


def test_http_404(tiny, server, cache):
    url = server.url("/missing/STM_weights.pth?dl=1")
    with pytest.raises(CheckpointError, match=re.escape(f"cannot download {url}: HTTP 404")):
        W.load_model("tiny", weights=url, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_connection_refused(tiny, cache):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(CheckpointError, match=f"cannot download {url}: .*refused"):
        W.load_model("tiny", weights=url, progress=False)


def test_download_cut_short(tiny, server, cache, tmp_path):
    data, _ = checkpoint_bytes(tmp_path)
    server.files["/w.pth"] = data
    server.short.add("/w.pth")
    url = server.url("/w.pth")
    with pytest.raises(CheckpointError, match=f"download of {url} (was cut short|to .* failed)"):
        W.load_model("tiny", weights=url, progress=False)
    assert list(cache.iterdir()) == []


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_STM_CACHE", str(tmp_path / "here"))
    assert W.cache_dir() == tmp_path / "here"
    assert W.cache_path("https://x.org/a/STM_weights.pth?dl=1").parent == tmp_path / "here"
    monkeypatch.delenv("NAPARI_STM_CACHE")
    assert W.cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" / "napari-stm"


def test_cache_name_from_url():
    name = W.cache_path("https://www.dropbox.com/s/mtfxdr93xc3q55i/STM_weights.pth?dl=1").name
    assert name.startswith("STM_weights-") and name.endswith(".pth")
    assert W.cache_path("https://x.org/").name.startswith("weights-")
    assert W.cache_path("https://x.org/a/b%20c.pth").name.startswith("b_c-")


def test_unsupported_scheme(tiny):
    with pytest.raises(InputError, match="unsupported URL scheme"):
        W.load_model("tiny", weights="ftp://x.org/w.pth", device="cpu")


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_official_layout_loads_into_stm_resnet50(tmp_path):
    if not OFFICIAL.is_dir():
        pytest.skip(f"reference files not found at {OFFICIAL} (../shared beside the repository)")
    if importlib.util.find_spec("napari_stm.core.network") is None:
        pytest.skip("napari_stm/core/network.py does not exist yet")
    make_weights = load_make_weights()
    torch.set_num_threads(1)
    official = make_weights.make_state_dict()
    assert all(k.startswith("module.") for k in official)
    path = save(official, tmp_path / "STM_weights.pth")

    model = W.load_model("stm-resnet50", weights=path, device="cpu", progress=False)

    assert type(model).__name__ == "STM" and model.name == "stm-resnet50"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    got = model.state_dict()
    assert got.keys() == {k.removeprefix("module.") for k in official}
    for key, value in official.items():
        mine = got[key.removeprefix("module.")]
        # make_weights stores the 0-d num_batches_tracked as [1]; torch loads it as 0-d
        assert torch.equal(mine, value.reshape(mine.shape)), key


def test_lite0_match_needs_no_weights():
    if importlib.util.find_spec("napari_stm.core.lite0_match") is None:
        pytest.skip("napari_stm/core/lite0_match.py does not exist yet")
    model = W.load_model("lite0-match", device="cpu")
    assert type(model).__name__ == "Lite0Match" and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_the_frames_format_chooses_the_bundled_model():
    assert W.default_model_name() == "stm-lite"
    assert W.default_model_name((360, 640, 3), np.uint8) == "stm-lite"
    assert W.default_model_name((360, 640, 4), "uint8") == "stm-lite"
    for shape, dtype in [
        ((512, 512), np.uint8),  # DIC, phase contrast
        ((690, 628), np.uint16),  # fluorescence
        ((64, 64, 1), np.uint8),
        ((64, 64, 3), np.uint16),  # 16-bit colour is not a camera's video
        ((64, 64), np.float32),
    ]:
        assert W.default_model_name(shape, dtype) == W.MICROSCOPY_MODEL == "stm-lite-cells"
    assert W.get_spec(W.MICROSCOPY_MODEL).weights == "weights/stm_lite_cells.pth"
