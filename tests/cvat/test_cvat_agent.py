"""The cvat-sdk tracking function, called the way cvat-cli's agent calls it."""

import numpy as np
import PIL.Image
import pytest
from cvat_helpers import b64png
from cvat_sdk.auto_annotation import (
    TrackableShape,
    TrackingFunctionContext,
    TrackingFunctionShapeContext,
    TrackingFunctionSpec,
)
from cvat_sdk.masks import encode_mask

import cvat_function.agent as agent
from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.sessions import MemorySessionStore
from cvat_function.shapes import ShapeError, polygon_from_mask
from napari_stm.core.runtime import prepare

N = 6


class Context(TrackingFunctionContext):
    pass


class ShapeContext(TrackingFunctionShapeContext):
    def __init__(self, shape_type: str) -> None:
        self._type = shape_type

    @property
    def original_shape_type(self) -> str:
        return self._type


def agent_track(function, frames, shape):
    """As cvat-cli's agent: preprocess each image, init on the first, track on the rest."""
    ctx = ShapeContext(shape.type)
    pp = function.preprocess_image(Context(), PIL.Image.fromarray(frames[0]))
    state = function.init_tracking_state(ctx, pp, shape)
    out = []
    for f in frames[1:N]:
        pp = function.preprocess_image(Context(), PIL.Image.fromarray(f))
        result = function.track(ctx, pp, state)
        assert result is None or result.type == shape.type
        out.append(result)
    return out


def nuclio_track(model, frames, shape):
    handler = ModelHandler(model, store=MemorySessionStore())
    body = {"image": b64png(frames[0]), "shapes": [{"type": shape.type, "points": shape.points}]}
    status, reply = handler.handle(body)
    assert status == 200
    out = []
    for f in frames[1:N]:
        status, reply = handler.handle({"image": b64png(f), "states": reply["states"]})
        assert status == 200
        out.append(reply["shapes"][0])
    return out


def test_spec_declares_masks_and_polygons():
    assert isinstance(agent.spec, TrackingFunctionSpec)
    assert agent.spec.supported_shape_types == {"rectangle", "mask", "polygon"}
    assert agent.StmTrackingFunction.spec == agent.spec
    for name in ("preprocess_image", "init_tracking_state", "track", "create"):
        assert callable(getattr(agent, name))


@pytest.mark.parametrize("shape_type", ["mask", "polygon"])
def test_agent_and_nuclio_give_the_same_shapes(model, clip, shape_type):
    frames, labels = clip
    mask = labels[0] == 1
    points = encode_mask(mask) if shape_type == "mask" else polygon_from_mask(mask)
    shape = TrackableShape(type=shape_type, points=points)
    got = agent_track(agent.StmTrackingFunction(model), frames, shape)
    want = nuclio_track(model, frames, shape)
    assert [None if s is None else {"type": s.type, "points": s.points} for s in got] == want


def test_lost_object_is_none(model, clip):
    frames, labels = clip
    function = agent.StmTrackingFunction(model)
    ctx = ShapeContext("mask")

    def pp(image):
        return function.preprocess_image(Context(), PIL.Image.fromarray(image))

    state = function.init_tracking_state(
        ctx, pp(frames[0]), TrackableShape(type="mask", points=encode_mask(labels[0] == 1))
    )
    # A black frame has nothing that matches the object: lost there, and the state lives on.
    assert function.track(ctx, pp(np.zeros_like(frames[1])), state) is None
    assert function.track(ctx, pp(frames[1]), state).type == "mask"


def test_bad_shape_is_a_value_error(model, clip):
    frames, _ = clip
    function = agent.StmTrackingFunction(model)
    pp = function.preprocess_image(Context(), PIL.Image.fromarray(frames[0]))
    with pytest.raises(ShapeError, match="malformed mask RLE"):
        function.init_tracking_state(
            ShapeContext("mask"), pp, TrackableShape(type="mask", points=[1, 2, 3, 4, 5])
        )


def test_create_takes_cvat_cli_parameters(model):
    function = agent.create(model="lite0-match", device="cpu", max_side=64)
    assert isinstance(function, agent.StmTrackingFunction)
    assert function.config.max_side == 64
    assert function.model.name == "lite0-match"


def _shapes(labels):
    """Three shapes on the first frame: objects 1 and 2 as masks, object 1 as a polygon."""
    first = labels[0]
    return [
        TrackableShape(type="mask", points=encode_mask(first == 1)),
        TrackableShape(type="mask", points=encode_mask(first == 2)),
        TrackableShape(type="polygon", points=polygon_from_mask(first == 1)),
    ]


def _request(function, image, states):
    """One track request as cvat-cli's agent runs it: one preprocess_image, then each state
    in turn (agent_driver_tracking._worker_job_track)."""
    pp = function.preprocess_image(Context(), PIL.Image.fromarray(image))
    return [function.track(ShapeContext(s.shape_type), pp, s) for s in states]


def _as_dict(shape):
    return None if shape is None else {"type": shape.type, "points": list(shape.points)}


def _alone(model, frames, shape, asked):
    """The shape tracked by a function of its own on the frames it is asked on."""
    function = agent.StmTrackingFunction(model)
    pp = function.preprocess_image(Context(), PIL.Image.fromarray(frames[0]))
    state = function.init_tracking_state(ShapeContext(shape.type), pp, shape)
    return {t: _as_dict(_request(function, frames[t], [state])[0]) for t in asked}


def test_agent_encodes_each_image_once_for_all_shapes(model, clip):
    frames, labels = clip
    shapes = _shapes(labels)
    function = agent.StmTrackingFunction(model)
    runtime = prepare(model, function.config)
    encoded: list = []
    segmented: list = []
    encode, segment = runtime.encode_query, runtime.segment
    runtime.encode_query = lambda image: encoded.append(1) or encode(image)
    runtime.segment = lambda q, k, v, *a, **kw: (
        segmented.append(v.shape[0]) or segment(q, k, v, *a, **kw)
    )
    try:
        pp = function.preprocess_image(Context(), PIL.Image.fromarray(frames[0]))
        states = [function.init_tracking_state(ShapeContext(s.type), pp, s) for s in shapes]
        assert len(encoded) == 1  # the start request: one query encoding for three shapes
        got = {}
        for t in range(1, N):
            encoded.clear()
            segmented.clear()
            got[t] = [_as_dict(s) for s in _request(function, frames[t], states)]
            # one query encoding, and one network read for the three shapes
            assert len(encoded) == 1 and segmented == [3]
    finally:
        del runtime.encode_query, runtime.segment
    for k, shape in enumerate(shapes):
        want = _alone(model, frames, shape, range(1, N))
        assert [got[t][k] for t in range(1, N)] == [want[t] for t in range(1, N)]


def test_agent_asked_for_some_shapes_gives_each_its_own_answer(model, clip):
    frames, labels = clip
    shapes = _shapes(labels)
    function = agent.StmTrackingFunction(model)
    pp = function.preprocess_image(Context(), PIL.Image.fromarray(frames[0]))
    states = [function.init_tracking_state(ShapeContext(s.type), pp, s) for s in shapes]
    # Which shapes each request asks, in its order: all, some, one, all again.
    asks = {1: [0, 1, 2], 2: [2, 0], 3: [1], 4: [0, 1, 2], 5: [1, 0]}
    got: dict[int, dict[int, dict | None]] = {k: {} for k in range(3)}
    for t, ask in asks.items():
        answers = _request(function, frames[t], [states[k] for k in ask])
        for k, shape in zip(ask, answers, strict=True):
            got[k][t] = _as_dict(shape)
    for k, shape in enumerate(shapes):
        asked = [t for t, ask in asks.items() if k in ask]
        assert got[k] == _alone(model, frames, shape, asked)
