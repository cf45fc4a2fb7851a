"""Shared fixtures of the CVAT adapter tests: one small model, one synthetic clip, Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from napari_stm.synthetic import make_clip

try:
    import cvat_sdk  # noqa: F401
    import nuclio_sdk  # noqa: F401
except ImportError:  # the cvat extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]

#: the fastest model; it needs no trained weights
MODEL = "lite0-match"
#: frames of the clip: one annotated, then 10 tracked
N_FRAMES = 11
HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="session")
def model():
    import torch

    from napari_stm.core.weights import load_model

    torch.manual_seed(0)
    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="session")
def clip():
    """frames [T, 96, 128, 3] uint8, labels [T, 96, 128] with objects 1 and 2."""
    # No occlusion: objects stay apart, so a tracking failure is the tracker's, not the clip's.
    return make_clip(N_FRAMES, HEIGHT, WIDTH, n_objects=2, seed=1, occlusion=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """(host, port) of a redis-server started for the tests; skipped when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    redis = pytest.importorskip("redis")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not start")
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
