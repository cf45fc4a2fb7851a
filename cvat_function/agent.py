"""A cvat-sdk tracking function for CVAT Online / Enterprise agents.

Register it and serve it with cvat-cli (the agent keeps each tracked shape's state, here a
Tracker with its memory bank, in its own process)::

    cvat-cli --server-host https://app.cvat.ai function create-native "napari-stm tracker" \\
        --function-module cvat_function.agent
    cvat-cli --server-host https://app.cvat.ai function run-agent <function id> \\
        --function-module cvat_function.agent [-p model=str:stm-resnet50 -p weights=str:PATH]

cvat-cli builds the function with :func:`create` (``-p name=type:value`` become its keyword
arguments). The module-level ``spec``, ``preprocess_image``, ``init_tracking_state`` and
``track`` make the module itself a tracking function too, with the default model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
from cvat_sdk.auto_annotation import (
    TrackableShape,
    TrackingFunctionContext,
    TrackingFunctionShapeContext,
    TrackingFunctionSpec,
)

from cvat_function import tracking
from cvat_function.shapes import TRACKER_TYPES
from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker
from napari_stm.core.model import VOSNetwork


class AgentFrame(SharedFrame):
    """One image of one cvat-cli request (its ``preprocess_image``): the frame the request's
    shapes share (its query encoded once, by the first of them), and the shapes stepped on it,
    the ones likely to be asked together on the next image."""

    def __init__(self, frame: np.ndarray) -> None:
        super().__init__(frame)
        self.cohort: weakref.WeakSet[TrackingState] = weakref.WeakSet()


@dataclass(eq=False)
class TrackingState:
    """What the agent keeps per tracked shape."""

    tracker: Tracker
    shape_type: str
    #: the shapes stepped on the same image as this one last (its last request's cohort);
    #: weak, so states cvat-cli forgets leave it
    cohort: weakref.WeakSet[TrackingState] = field(default_factory=weakref.WeakSet, repr=False)

    def moved_to(self, frame: AgentFrame) -> None:
        self.cohort.discard(self)
        self.cohort = frame.cohort
        self.cohort.add(self)


class StmTrackingFunction:
    """cvat-sdk ``TrackingFunction`` running the napari-stm propagation engine."""

    spec = TrackingFunctionSpec(supported_shape_types=TRACKER_TYPES)

    def __init__(self, model: VOSNetwork, config: PropagationConfig | None = None) -> None:
        self.model = model
        self.config = config or PropagationConfig()

    def preprocess_image(
        self, context: TrackingFunctionContext, image: PIL.Image.Image
    ) -> AgentFrame:
        # cvat-cli's agent calls this once per request and hands the result to every shape
        # of the request (agent_driver_tracking.py): the RGB array here, the network input
        # and query features by the first tracker that steps it.
        return AgentFrame(np.asarray(image.convert("RGB")))

    def init_tracking_state(
        self, context: TrackingFunctionShapeContext, pp_image: AgentFrame, shape: TrackableShape
    ) -> TrackingState:
        rgb = pp_image.frame
        # ShapeError (a ValueError) tells the agent the request was bad.
        mask = tracking.reference_mask(shape.type, list(shape.points), rgb.shape[:2])
        mask = tracking.object_mask(rgb, shape.type, mask)
        tracker = tracking.start(self.model, self.config, pp_image, mask)
        state = TrackingState(tracker, shape.type)
        state.moved_to(pp_image)
        return state

    def track(
        self, context: TrackingFunctionShapeContext, pp_image: AgentFrame, state: TrackingState
    ) -> TrackableShape | None:
        # cvat-cli asks for the request's shapes one at a time, each answer before the next
        # question, and does not say which shapes are in the request. The shapes stepped
        # together last time (the state's cohort) are likely asked again: the first of them
        # asked on this image computes all their steps in shared network calls, and each
        # takes its own when asked. One never asked is left as it was (step_trackers), so
        # asking only some shapes gives each the answer it gets when all are asked, and a
        # cohort shrinks to the shapes really asked after one image.
        ahead = [other.tracker for other in list(state.cohort) if other is not state]
        (mask,) = tracking.follow([state.tracker], pp_image, ahead=ahead)
        state.moved_to(pp_image)
        shape = tracking.shape_out(state.shape_type, mask)
        # None: lost on this frame; the state goes on and may find it again
        return None if shape is None else TrackableShape(**shape)


def create(
    model: str | None = None,
    weights: str | None = None,
    device: str | None = None,
    max_side: int | None = None,
) -> StmTrackingFunction:
    """The function cvat-cli runs: ``-p model=str:NAME -p weights=str:PATH -p device=str:cuda``."""
    from napari_stm.core.weights import default_model_name, load_model

    net = load_model(model or default_model_name(), weights=weights, device=device)
    return StmTrackingFunction(net, PropagationConfig(max_side=max_side))


_default: StmTrackingFunction | None = None


def _function() -> StmTrackingFunction:
    global _default
    if _default is None:
        _default = create()
    return _default


spec = StmTrackingFunction.spec


def preprocess_image(context: TrackingFunctionContext, image: PIL.Image.Image) -> AgentFrame:
    return _function().preprocess_image(context, image)


def init_tracking_state(
    context: TrackingFunctionShapeContext, pp_image: AgentFrame, shape: TrackableShape
) -> Any:
    return _function().init_tracking_state(context, pp_image, shape)


def track(
    context: TrackingFunctionShapeContext, pp_image: AgentFrame, state: Any
) -> TrackableShape | None:
    return _function().track(context, pp_image, state)
