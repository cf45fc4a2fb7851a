"""Session stores: serialisation, Redis (a real redis-server), and settings from the environment."""

import json

import numpy as np
import pytest
import torch
from cvat_helpers import b64png
from cvat_sdk.masks import encode_mask
from nuclio_sdk import Event
from nuclio_sdk.test import Platform

from cvat_function.nuclio import main
from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    Session,
    StoreSettings,
    dumps_session,
    loads_session,
    make_store,
)
from napari_stm.core.engine import PropagationConfig, Tracker

N_STEPS = 6


def run(handler, frames, mask, shape_type="mask"):
    from cvat_function.shapes import polygon_from_mask

    points = encode_mask(mask) if shape_type == "mask" else polygon_from_mask(mask)
    status, reply = handler.handle(
        {"image": b64png(frames[0]), "shapes": [{"type": shape_type, "points": points}]}
    )
    assert status == 200, reply
    state = reply["states"][0]
    out = []
    for f in frames[1 : N_STEPS + 1]:
        status, reply = handler.handle({"image": b64png(f), "shapes": [None], "states": [state]})
        assert status == 200, reply
        state = reply["states"][0]
        out.append(reply["shapes"][0])
    return out, state


@pytest.mark.parametrize("storage", [None, torch.float16])  # float16: as on CUDA
def test_serialised_tracker_continues_exactly(model, clip, storage):
    frames, labels = clip
    cfg = PropagationConfig(mem_every=2, max_memory=4)  # working memory fills and forgets
    live = Tracker(model, cfg, keep_sources=False)
    live.bank.storage_dtype = storage
    live.step(frames[0], (labels[0] == 1).astype(np.uint8))
    for f in frames[1:6]:
        live.step(f)
    session = Session(live, "mask", frames.shape[1:3])
    copy = loads_session(dumps_session(session), model, cfg)
    assert copy.shape_type == "mask" and copy.size == session.size
    assert copy.tracker.bank.kinds() == live.bank.kinds()
    assert copy.tracker.bank.storage_dtype == storage
    for f in frames[6:]:
        a, pa = live.step(f)
        b, pb = copy.tracker.step(f)
        assert np.array_equal(a, b)
        assert np.allclose(pa, pb)


def test_redis_sessions_match_in_process_sessions(model, clip, redis_server):
    import redis

    host, port = redis_server
    client = redis.Redis(host=host, port=port)
    frames, labels = clip
    cfg = PropagationConfig()
    in_process, _ = run(ModelHandler(model, cfg, MemorySessionStore()), frames, labels[0] == 1)
    store = RedisSessionStore(client, model, cfg, ttl=120)
    in_redis, state = run(ModelHandler(model, cfg, store), frames, labels[0] == 1)
    assert in_redis == in_process
    key = store.prefix + state["session"]
    assert 0 < client.ttl(key) <= 120  # expires in Redis unless used again
    polygons, _ = run(ModelHandler(model, cfg, store), frames, labels[0] == 2, "polygon")
    assert all(s["type"] == "polygon" for s in polygons)

    # Gone from Redis (expired or flushed): a clear 404, and the handler goes on.
    client.delete(key)
    status, reply = ModelHandler(model, cfg, store).handle(
        {"image": b64png(frames[3]), "states": [state]}
    )
    assert status == 404 and "unknown or expired" in reply["error"]
    client.set(key, b"not a session")
    status, reply = ModelHandler(model, cfg, store).handle(
        {"image": b64png(frames[3]), "states": [state]}
    )
    assert status == 404


def test_two_workers_share_sessions_through_redis(clip, redis_server):
    """Nuclio runs one process per worker: with Redis, any worker can take the next frame."""
    host, port = redis_server
    frames, labels = clip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_STM_MODEL", "lite0-match")
        mp.setenv("NAPARI_STM_DEVICE", "cpu")
        mp.setenv("CVAT_FUNCTIONS_REDIS_HOST", host)
        mp.setenv("CVAT_FUNCTIONS_REDIS_PORT", str(port))
        workers = [Platform(), Platform()]

        def call(worker, body):
            event = Event(body=json.dumps(body), content_type="application/json")
            response = worker.call_handler(main.handler, event)
            return response.status_code, json.loads(response.body)

        shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
        status, reply = call(workers[0], {"image": b64png(frames[0]), "shapes": [shape]})
        assert status == 200
        state = reply["states"][0]
        for t in range(1, 4):
            status, reply = call(workers[t % 2], {"image": b64png(frames[t]), "states": [state]})
            assert status == 200, reply
            assert reply["shapes"][0]["type"] == "mask"
            state = reply["states"][0]
        handlers = [w._handler_contexts[main.handler].user_data.model_handler for w in workers]
        assert all(isinstance(h.store, RedisSessionStore) for h in handlers)


def test_store_settings_from_env(model):
    settings = StoreSettings.from_env(
        {
            "NAPARI_STM_SESSION_TTL": "90",
            "NAPARI_STM_MAX_SESSIONS": "3",
            "NAPARI_STM_SESSION_BYTES": "1000000",
        }
    )
    assert (settings.ttl, settings.max_sessions, settings.max_bytes) == (90.0, 3, 1000000)
    store = make_store(settings, model, PropagationConfig())
    assert isinstance(store, MemorySessionStore) and store.max_sessions == 3
    redis_settings = StoreSettings.from_env(
        {"CVAT_FUNCTIONS_REDIS_HOST": "kvrocks", "CVAT_FUNCTIONS_REDIS_PORT": "6666"}
    )
    assert isinstance(make_store(redis_settings, model, PropagationConfig()), RedisSessionStore)
    with pytest.raises(ValueError, match="NAPARI_STM_MAX_SESSIONS='many'"):
        StoreSettings.from_env({"NAPARI_STM_MAX_SESSIONS": "many"})


def test_session_ids_are_unique_and_long(model, clip):
    frames, labels = clip
    store = MemorySessionStore()
    tracker = Tracker(model)
    tracker.step(frames[0], (labels[0] == 1).astype(np.uint8))
    ids = {store.add(Session(tracker, "mask", frames.shape[1:3])) for _ in range(50)}
    assert len(ids) == 50
    assert min(len(i) for i in ids) >= 43


def test_unreachable_redis_is_503_not_a_crash(model, clip):
    import socket

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    handler = ModelHandler(model, store=RedisSessionStore(client, model, PropagationConfig()))
    frames, labels = clip
    body = {
        "image": b64png(frames[0]),
        "shapes": [{"type": "mask", "points": encode_mask(labels[0] == 1)}],
    }
    status, reply = handler.handle(body)
    assert status == 503
    assert f"Redis at 127.0.0.1:{port}" in reply["error"]
    status, reply = handler.handle(
        {"image": b64png(frames[1]), "states": [{"session": "a" * 43, "step": 0}]}
    )
    assert status == 503
