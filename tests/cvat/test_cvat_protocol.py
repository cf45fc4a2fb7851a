"""The tracker as CVAT's server drives it (tests/cvat/cvat_lambda.py: signed states, null
shapes dropped, errors reduced to the status line), and the session guarantees that depend on
it: replays refused, one step at a time per session, 8 h lifetime, fair eviction, Redis that
fails fast."""

import socket
import threading
import time
from unittest import mock

import numpy as np
import pytest
from cvat_helpers import b64png
from cvat_lambda import CvatError, CvatLambda
from cvat_sdk.masks import decode_mask, encode_mask
from nuclio_sdk.test import Platform

from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.sessions import (
    DEFAULT_TTL,
    MemorySessionStore,
    RedisSessionStore,
    SessionBusy,
    StoreSettings,
    make_store,
)
from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.runtime import prepare


@pytest.fixture(scope="module")
def platform():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_STM_MODEL", "lite0-match")
        mp.setenv("NAPARI_STM_DEVICE", "cpu")
        mp.delenv("CVAT_FUNCTIONS_REDIS_HOST", raising=False)
        yield Platform()


def test_mask_tracking_as_cvat_drives_it(platform, clip, model):
    frames, labels = clip
    cvat = CvatLambda(platform, frames)
    first = labels[0] == 1
    reply = cvat.call(0, shapes=[{"type": "mask", "points": encode_mask(first)}], states=[])
    states = reply["states"]
    assert all(isinstance(s, str) and s.count(":") >= 2 for s in states)  # signed by CVAT
    tracker = Tracker(model, PropagationConfig())
    tracker.step(frames[0], first.astype(np.uint8))
    for t in range(1, 6):
        # CVAT's UI sends null shapes on continue calls; invoke() drops null fields.
        reply = cvat.call(t, shapes=None, states=states)
        states = reply["states"]
        got = decode_mask(reply["shapes"][0]["points"], image_width=128, image_height=96)
        assert np.array_equal(got, tracker.step(frames[t])[0] == 1)


def test_replayed_and_forged_states(platform, clip):
    frames, labels = clip
    cvat = CvatLambda(platform, frames)
    shape = {"type": "mask", "points": encode_mask(labels[0] == 2)}
    s0 = cvat.call(0, shapes=[shape], states=[])["states"]
    s1 = cvat.call(1, states=s0)["states"]
    with pytest.raises(CvatError) as e:  # the same request again: the session moved on
        cvat.call(1, states=s0)
    assert e.value.status == 409 and e.value.text.startswith("409 Client Error: Conflict")
    cvat.call(2, states=s1)  # the live state still works

    calls = cvat.calls
    forged = s1[0][:-3] + ("AAA" if not s1[0].endswith("AAA") else "BBB")
    with pytest.raises(CvatError, match="Invalid or expired tracker state"):
        cvat.call(2, states=[forged])
    assert cvat.calls == calls  # CVAT refuses it; the function never sees it


def test_states_live_8_hours(model, clip, platform):
    frames, labels = clip
    now = [1000.0]
    store = MemorySessionStore(clock=lambda: now[0])
    assert store.ttl == DEFAULT_TTL == 8 * 3600  # CVAT's TRACKER_STATE_MAX_AGE
    handler = ModelHandler(model, store=store)
    _, reply = handler.handle(
        {
            "image": b64png(frames[0]),
            "shapes": [{"type": "mask", "points": encode_mask(labels[0] == 1)}],
        }
    )
    now[0] += 8 * 3600 - 60
    status, reply = handler.handle({"image": b64png(frames[1]), "states": reply["states"]})
    assert status == 200

    # Past 8 h CVAT refuses the signed state itself.
    cvat = CvatLambda(platform, frames)
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    states = cvat.call(0, shapes=[shape], states=[])["states"]
    later = time.time() + 8 * 3600 + 5
    with mock.patch("django.core.signing.time.time", return_value=later):
        with pytest.raises(CvatError, match="Invalid or expired tracker state"):
            cvat.call(1, states=states)


def test_rectangles_in_cvats_rectangle_protocol(platform, clip):
    frames, labels = clip
    cvat = CvatLambda(platform, frames)
    ys, xs = np.nonzero(labels[0] == 1)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    reply = cvat.call(0, shapes=[box], states=[])
    assert reply["shapes"] == [box]
    states = reply["states"]
    for t in range(1, 5):
        # As CVAT's own rectangle trackers are called: the last box comes back with the state.
        reply = cvat.call(t, shapes=[box], states=states)
        states, box = reply["states"], reply["shapes"][0]
        assert isinstance(box, list) and len(box) == 4
        ys, xs = np.nonzero(labels[t] == 1)
        want = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        inter = max(0, min(box[2], want[2]) - max(box[0], want[0])) * max(
            0, min(box[3], want[3]) - max(box[1], want[1])
        )
        union = (
            (box[2] - box[0]) * (box[3] - box[1])
            + (want[2] - want[0]) * (want[3] - want[1])
            - inter
        )
        assert inter / union > 0.5
    reply = cvat.call(5, shapes=[{"type": "rectangle", "points": box}], states=[])
    assert reply["shapes"][0] == {"type": "rectangle", "points": box}


def test_duplicated_concurrent_requests_step_once(model, clip):
    frames, labels = clip
    handler = ModelHandler(model, store=MemorySessionStore())
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    state = handler.handle({"image": b64png(frames[0]), "shapes": [shape]})[1]["states"][0]
    body = {"image": b64png(frames[1]), "states": [state]}
    results = []
    barrier = threading.Barrier(2)

    def go():
        barrier.wait()
        results.append(handler.handle(body))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 409], results
    assert handler.store.get(state["session"]).step == 1


def test_a_big_request_cannot_evict_a_small_user(model, clip):
    frames, labels = clip
    probe = ModelHandler(model, store=MemorySessionStore())
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    probe.handle({"image": b64png(frames[0]), "shapes": [shape]})
    one = probe.store.nbytes
    store = MemorySessionStore(max_bytes=int(one * 4.5))
    handler = ModelHandler(model, store=store)
    small = handler.handle({"image": b64png(frames[0]), "shapes": [shape]})[1]["states"][0]
    status, reply = handler.handle({"image": b64png(frames[0]), "shapes": [shape] * 6})
    assert status == 507 and "do not fit" in reply["error"]
    assert len(store) == 1  # the big request left nothing behind
    status, _ = handler.handle({"image": b64png(frames[1]), "states": [small]})
    assert status == 200
    # Sessions unused for idle_grace make room for anybody.
    store.idle_grace = 0.0
    status, reply = handler.handle({"image": b64png(frames[0]), "shapes": [shape] * 4})
    assert status == 200


def test_memory_accounting_includes_the_pending_frame(model, clip):
    frames, labels = clip
    tracker = Tracker(model, PropagationConfig(), keep_sources=False)
    tracker.step(frames[0], (labels[0] == 1).astype(np.uint8))
    tracker.step(frames[1])
    assert tracker._pending is not None
    assert tracker.memory_nbytes > tracker.bank.nbytes + frames[1].size  # image and features


def test_redis_lock_holds_across_clients(model, clip, redis_server):
    import redis

    host, port = redis_server
    settings = StoreSettings(redis_host=host, redis_port=port, lock_timeout=30)
    a = make_store(settings, model, PropagationConfig())
    b = make_store(settings, model, PropagationConfig())  # another process's connection
    sid = "L" * 43
    with a.locked([sid]):
        with pytest.raises(SessionBusy):
            with b.locked([sid]):
                pass
    with b.locked([sid]):  # released
        pass
    assert redis.Redis(host=host, port=port).exists(a.prefix + sid + ":lock") == 0


def test_redis_replay_across_handlers_is_409(model, clip, redis_server):
    host, port = redis_server
    settings = StoreSettings(redis_host=host, redis_port=port)
    cfg = PropagationConfig()
    h1 = ModelHandler(model, cfg, make_store(settings, model, cfg))
    h2 = ModelHandler(model, cfg, make_store(settings, model, cfg))
    frames, labels = clip
    shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
    state = h1.handle({"image": b64png(frames[0]), "shapes": [shape]})[1]["states"]
    body = {"image": b64png(frames[1]), "states": state}
    assert h1.handle(body)[0] == 200
    status, reply = h2.handle(body)
    assert status == 409 and "replayed" in reply["error"]


def test_hung_redis_fails_fast_with_503(model, clip):
    frames, labels = clip
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    port = server.getsockname()[1]
    try:
        settings = StoreSettings(redis_host="127.0.0.1", redis_port=port, redis_timeout=0.5)
        store = make_store(settings, model, PropagationConfig())
        assert isinstance(store, RedisSessionStore)
        handler = ModelHandler(model, store=store)
        shape = {"type": "mask", "points": encode_mask(labels[0] == 1)}
        start = time.monotonic()
        status, reply = handler.handle({"image": b64png(frames[0]), "shapes": [shape]})
        assert status == 503 and "Redis" in reply["error"]
        status, reply = handler.handle(
            {"image": b64png(frames[0]), "states": [{"session": "a" * 43, "step": 0}]}
        )
        assert status == 503
        assert time.monotonic() - start < 20  # not socket_timeout=30 plus retries
    finally:
        server.close()


@pytest.mark.parametrize("name", ["function.yaml", "function-gpu.yaml"])
def test_function_yaml_agrees_with_cvat_and_the_handler(name):
    from pathlib import Path

    import yaml

    from cvat_function.limits import Limits
    from cvat_function.shapes import TRACKER_TYPES

    path = Path(__file__).parents[2] / "cvat_function" / "nuclio" / name
    spec = yaml.safe_load(path.read_text())
    notes = spec["metadata"]["annotations"]
    assert notes["type"] == "tracker"
    assert {t.strip() for t in notes["supported_shape_types"].split(",")} == set(TRACKER_TYPES)
    event_timeout = float(spec["spec"]["eventTimeout"].rstrip("s"))
    settings = StoreSettings()
    # CVAT's invocation timeout (CVAT_NUCLIO_DEFAULT_TIMEOUT, 120 s) ends first; a Redis call
    # fails well inside it; a dead worker's session lock outlives any live step.
    assert 120 < event_timeout < settings.lock_timeout
    assert settings.redis_timeout < 120
    env = {e["name"]: e["value"] for e in spec["spec"]["env"]}
    assert float(env["NAPARI_STM_SESSION_TTL"]) == DEFAULT_TTL
    trigger = spec["spec"]["triggers"]["myHttpTrigger"]
    assert trigger["attributes"]["maxRequestBodySize"] == Limits().max_body_bytes


def test_a_box_seeds_the_object_inside_it():
    from cvat_function.shapes import mask_from_rectangle
    from cvat_function.tracking import box_seeded_mask

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :160]
    disc = (yy - 60) ** 2 + (xx - 80) ** 2 < 30**2
    image = rng.integers(0, 60, (120, 160, 3), dtype=np.uint8)
    image[disc] = rng.integers(180, 255, (int(disc.sum()), 3), dtype=np.uint8)
    box = mask_from_rectangle([46, 26, 114, 94], 120, 160)
    seeded = box_seeded_mask(image, box)
    assert not (seeded & ~box).any()
    assert (seeded & disc).sum() / (seeded | disc).sum() > 0.9
    assert (box & disc).sum() / (box | disc).sum() < 0.7
    assert np.array_equal(box_seeded_mask(image, box), seeded)  # seeded: the same every time
    whole = np.ones((120, 160), bool)
    assert box_seeded_mask(image, whole).sum() > 0


def test_redis_sessions_memorise_a_request_in_one_encoder_call(model, clip, redis_server):
    host, port = redis_server
    settings = StoreSettings(redis_host=host, redis_port=port)
    cfg = PropagationConfig()
    redis_handler = ModelHandler(model, cfg, make_store(settings, model, cfg))
    memory_handler = ModelHandler(model, cfg, MemorySessionStore())
    frames, labels = clip
    shapes = [
        {"type": "mask", "points": encode_mask(labels[0] == i)} for i in (1, 2, 1)
    ]  # three sessions
    runtime = prepare(model, cfg)
    encode = runtime.encode_memory
    calls: list = []
    runtime.encode_memory = lambda *a, **kw: calls.append(kw) or encode(*a, **kw)
    try:
        replies = [
            h.handle({"image": b64png(frames[0]), "shapes": shapes})[1]
            for h in (redis_handler, memory_handler)
        ]
        for t in (1, 2):
            calls.clear()
            got = []
            for k, h in enumerate((redis_handler, memory_handler)):
                body = {"image": b64png(frames[t]), "states": replies[k]["states"]}
                status, replies[k] = h.handle(body)
                assert status == 200
                got.append(replies[k]["shapes"])
                if k == 0:  # saved to Redis: the three memories written by one call
                    assert calls == [{"groups": 3}]
            assert got[0] == got[1]  # the same masks as in-process sessions
    finally:
        del runtime.encode_memory
