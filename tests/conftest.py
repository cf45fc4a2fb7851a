"""Shared fixtures of the engine tests: a tiny real network (see ``tiny_network.py``)."""

from __future__ import annotations

import pytest
import torch
from tiny_network import TinyMatch


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    # Tiny tensors gain nothing from more threads, and on a busy machine every op would wait
    # for a free core (50x slower measured on 2 shared cores).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model() -> TinyMatch:
    return TinyMatch()
