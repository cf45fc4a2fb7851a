"""Every bad request gets a 4xx JSON answer naming its cause; nothing else changes."""

import base64
import json

import numpy as np
import pytest
from cvat_helpers import b64png
from cvat_sdk.masks import encode_mask
from nuclio_sdk import Event
from nuclio_sdk.test import Platform

from cvat_function.nuclio import main
from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.sessions import MemorySessionStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def handler(model, clock):
    return ModelHandler(model, store=MemorySessionStore(ttl=600, clock=clock))


def start(handler, frame, mask):
    status, reply = handler.handle(
        {"image": b64png(frame), "shapes": [{"type": "mask", "points": encode_mask(mask)}]}
    )
    assert status == 200, reply
    return reply["states"][0]


def step(handler, frame, state):
    """One tracked frame; ``state`` is updated in place to the new one (states carry a step
    count, so an old state would be refused as a replay)."""
    status, reply = handler.handle({"image": b64png(frame), "shapes": [None], "states": [state]})
    assert status == 200, reply
    state.update(reply["states"][0])
    return reply["shapes"][0], reply["states"][0]


def bad_requests(frames, labels, state):
    """(name, body, status, words of the message) for every kind of bad request."""
    img = b64png(frames[1])
    mask = encode_mask(labels[0] == 1)
    small = b64png(frames[1][:64, :96])
    return [
        ("not json", b"{'image': 1", 400, "not JSON"),
        ("not utf-8", b"\xff\xfe\x00", 400, "not JSON"),
        ("empty body", b"", 400, "empty"),
        ("json list", "[1, 2]", 400, "JSON object"),
        ("no image", {"shapes": [{"type": "mask", "points": mask}]}, 400, "missing 'image'"),
        ("image not text", {"image": 12, "states": [state]}, 400, "base64 string"),
        ("bad base64", {"image": "@@not base64@@", "states": [state]}, 400, "not valid base64"),
        (
            "not an image",
            {"image": base64.b64encode(b"hello, world").decode(), "states": [state]},
            415,
            "not an image in a format CVAT serves",
        ),
        (
            "truncated png",
            {"image": base64.b64encode(base64.b64decode(img)[:200]).decode(), "states": [state]},
            400,
            "image",
        ),
        (
            "ellipse",
            {"image": img, "shapes": [{"type": "ellipse", "points": [1, 2, 30, 40]}]},
            422,
            "unsupported shape type 'ellipse'",
        ),
        (
            "bad rle",
            {"image": img, "shapes": [{"type": "mask", "points": [3, 4, 0, 0, 5, 5]}]},
            400,
            "malformed mask RLE",
        ),
        (
            "rle bbox outside",
            {"image": img, "shapes": [{"type": "mask", "points": [4, 500, 500, 501, 501]}]},
            400,
            "malformed mask RLE",
        ),
        (
            "odd polygon",
            {"image": img, "shapes": [{"type": "polygon", "points": [1, 1, 20, 1, 20]}]},
            400,
            "malformed polygon",
        ),
        (
            "text in polygon",
            {"image": img, "shapes": [{"type": "polygon", "points": [1, 1, "x", 9, 20, 20]}]},
            400,
            "non-numeric",
        ),
        ("no points", {"image": img, "shapes": [{"type": "mask"}]}, 400, "no 'points'"),
        ("shape not object", {"image": img, "shapes": ["mask"]}, 400, "must be an object"),
        (
            "unknown session",
            {"image": img, "shapes": [None], "states": [{"session": "x" * 43, "step": 0}]},
            404,
            "unknown or expired tracking session",
        ),
        ("malformed state", {"image": img, "states": ["abc"]}, 400, "malformed state"),
        ("states not list", {"image": img, "states": {"a": 1}}, 400, "'states' must be a list"),
        ("nothing", {"image": img, "shapes": [], "states": []}, 400, "nothing to track"),
        ("neither", {"image": img, "shapes": [None], "states": [None]}, 400, "neither"),
        (
            "twice",
            {"image": img, "shapes": [None, None], "states": [state, state]},
            400,
            "appears twice",
        ),
        ("size changed", {"image": small, "states": [state]}, 409, "image size changed"),
    ]


def test_every_error_is_a_4xx_with_its_cause(handler, clip):
    frames, labels = clip
    state = start(handler, frames[0], labels[0] == 1)
    for name, body, status, words in bad_requests(frames, labels, state):
        got_status, reply = handler.handle(body)
        assert got_status == status, (name, reply)
        assert set(reply) == {"error"}, name
        assert words in reply["error"], (name, reply["error"])


def test_errors_through_nuclio_are_json_responses(clip):
    frames, labels = clip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_STM_MODEL", "lite0-match")
        mp.setenv("NAPARI_STM_DEVICE", "cpu")
        mp.delenv("CVAT_FUNCTIONS_REDIS_HOST", raising=False)
        platform = Platform()
        for body, status in [
            (b"not json at all", 400),
            (json.dumps({"shapes": []}), 400),
            (
                json.dumps(
                    {"image": b64png(frames[0]), "states": [{"session": "g" * 43, "step": 1}]}
                ),
                404,
            ),
            (json.dumps({"image": b64png(frames[0]), "states": [{"session": "gone"}]}), 400),
        ]:
            event = Event(body=body, content_type="application/json", method="POST")
            response = platform.call_handler(main.handler, event)
            assert response.status_code == status
            assert response.content_type == "application/json"
            assert json.loads(response.body)["error"]


def test_errors_leave_every_session_as_it_was(model, handler, clip):
    frames, labels = clip
    ref = ModelHandler(model, store=MemorySessionStore())
    want_state = start(ref, frames[0], labels[0] == 2)
    want = [step(ref, frames[t], want_state)[0] for t in (1, 2)]

    other = start(handler, frames[0], labels[0] == 1)
    state = start(handler, frames[0], labels[0] == 2)
    got = [step(handler, frames[1], state)[0]]
    for _, body, _, _ in bad_requests(frames, labels, other):
        handler.handle(body)
    # A bad object next to a good one: the whole request is refused, the good session untouched.
    status, _ = handler.handle(
        {
            "image": b64png(frames[2]),
            "shapes": [None, {"type": "ellipse", "points": [1, 2, 3, 4]}],
            "states": [state, None],
        }
    )
    assert status == 422
    got.append(step(handler, frames[2], state)[0])
    assert got == want
    assert step(handler, frames[1], other)[0] is not None


def test_new_sessions_of_a_failed_request_are_dropped(handler, clip):
    frames, labels = clip
    store = handler.store
    state = start(handler, frames[0], labels[0] == 1)
    before = len(store)
    status, _ = handler.handle(
        {
            "image": b64png(frames[1]),
            "shapes": [{"type": "mask", "points": encode_mask(labels[1] == 2)}, None],
            "states": [None, {"session": "unknown" * 6 + "x", "step": 3}],
        }
    )
    assert status == 404
    assert len(store) == before
    assert step(handler, frames[1], state)[0] is not None


def test_expired_session(handler, clock, clip):
    frames, labels = clip
    state = start(handler, frames[0], labels[0] == 1)
    clock.now += 599
    step(handler, frames[1], state)  # in use: the time to live starts again
    clock.now += 599
    step(handler, frames[2], state)
    clock.now += 601
    status, reply = handler.handle({"image": b64png(frames[3]), "states": [state]})
    assert status == 404
    assert "expired after 600 s unused" in reply["error"]


def test_session_cap_evicts_the_least_recently_used(model, clip):
    frames, labels = clip
    handler = ModelHandler(model, store=MemorySessionStore(max_sessions=2))
    a = start(handler, frames[0], labels[0] == 1)
    b = start(handler, frames[0], labels[0] == 2)
    step(handler, frames[1], a)  # a is now more recent than b
    c = start(handler, frames[0], labels[0] == 1)
    status, reply = handler.handle({"image": b64png(frames[1]), "states": [b]})
    assert status == 404 and "was evicted: the function holds at most 2 sessions" in reply["error"]
    step(handler, frames[2], a)
    step(handler, frames[1], c)


def test_byte_cap_evicts_the_oldest(model, clip):
    frames, labels = clip
    probe = ModelHandler(model, store=MemorySessionStore())
    s = start(probe, frames[0], labels[0] == 1)
    step(probe, frames[1], s)
    one = probe.store.nbytes
    assert one > 0

    store = MemorySessionStore(max_bytes=int(one * 1.5))
    handler = ModelHandler(model, store=store)
    a = start(handler, frames[0], labels[0] == 1)
    b = start(handler, frames[0], labels[0] == 2)
    assert store.nbytes <= int(one * 1.5)
    status, reply = handler.handle({"image": b64png(frames[1]), "states": [a]})
    assert status == 404 and "bytes of memory" in reply["error"]
    step(handler, frames[1], b)


def test_internal_errors_are_500_and_the_worker_lives_on(handler, clip, monkeypatch):
    frames, labels = clip
    state = start(handler, frames[0], labels[0] == 1)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    tracker = handler.store.get(state["session"]).tracker
    # The network call, where an accelerator runs out of memory (the request's trackers step
    # together through step_trackers, not Tracker.step).
    monkeypatch.setattr(tracker.runtime, "segment", broken)
    status, reply = handler.handle({"image": b64png(frames[1]), "states": [state]})
    assert status == 500
    assert "CUDA out of memory (simulated)" in reply["error"]
    monkeypatch.undo()
    assert step(handler, frames[1], state)[0] is not None


def test_handler_rejects_an_all_empty_mask(handler, clip):
    frames, _ = clip
    empty = np.zeros(frames.shape[1:3], bool)
    empty[0, 0] = True
    points = encode_mask(empty)
    points[:-4] = [sum(points[:-4])]  # all background
    status, reply = handler.handle(
        {"image": b64png(frames[0]), "shapes": [{"type": "mask", "points": points}]}
    )
    assert status == 400 and "covers no pixel" in reply["error"]
