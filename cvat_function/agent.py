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

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
from cvat_sdk.auto_annotation import (
    TrackableShape,
    TrackingFunctionContext,
    TrackingFunctionShapeContext,
    TrackingFunctionSpec,
)

from cvat_function.shapes import SUPPORTED_TYPES, mask_from_shape, shape_points
from napari_stm.core.engine import PropagationConfig, Tracker
from napari_stm.core.model import VOSNetwork

OBJECT_ID = 1


@dataclass
class TrackingState:
    """What the agent keeps per tracked shape."""

    tracker: Tracker
    shape_type: str


class StmTrackingFunction:
    """cvat-sdk ``TrackingFunction`` running the napari-stm propagation engine."""

    spec = TrackingFunctionSpec(supported_shape_types=SUPPORTED_TYPES)

    def __init__(self, model: VOSNetwork, config: PropagationConfig | None = None) -> None:
        self.model = model
        self.config = config or PropagationConfig()

    def preprocess_image(
        self, context: TrackingFunctionContext, image: PIL.Image.Image
    ) -> np.ndarray:
        return np.asarray(image.convert("RGB"))

    def init_tracking_state(
        self, context: TrackingFunctionShapeContext, pp_image: np.ndarray, shape: TrackableShape
    ) -> TrackingState:
        h, w = pp_image.shape[:2]
        # ShapeError (a ValueError) tells the agent the request was bad.
        mask = mask_from_shape(shape.type, list(shape.points), h, w)
        # One object per state, known from the start: no need to keep memorised frames.
        tracker = Tracker(self.model, self.config, keep_sources=False)
        tracker.step(pp_image, mask.astype(np.uint8) * OBJECT_ID)
        return TrackingState(tracker, shape.type)

    def track(
        self, context: TrackingFunctionShapeContext, pp_image: np.ndarray, state: TrackingState
    ) -> TrackableShape | None:
        labels, _ = state.tracker.step(pp_image)
        points = shape_points(state.shape_type, labels == OBJECT_ID)
        if points is None:
            return None  # lost on this frame; the state goes on and may find it again
        return TrackableShape(type=state.shape_type, points=points)


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


def preprocess_image(context: TrackingFunctionContext, image: PIL.Image.Image) -> np.ndarray:
    return _function().preprocess_image(context, image)


def init_tracking_state(
    context: TrackingFunctionShapeContext, pp_image: np.ndarray, shape: TrackableShape
) -> Any:
    return _function().init_tracking_state(context, pp_image, shape)


def track(
    context: TrackingFunctionShapeContext, pp_image: np.ndarray, state: Any
) -> TrackableShape | None:
    return _function().track(context, pp_image, state)
