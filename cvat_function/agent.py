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

from cvat_function import tracking
from cvat_function.shapes import TRACKER_TYPES
from napari_stm.core.engine import PropagationConfig, SharedFrame, Tracker
from napari_stm.core.model import VOSNetwork


@dataclass
class TrackingState:
    """What the agent keeps per tracked shape."""

    tracker: Tracker
    shape_type: str


class StmTrackingFunction:
    """cvat-sdk ``TrackingFunction`` running the napari-stm propagation engine."""

    spec = TrackingFunctionSpec(supported_shape_types=TRACKER_TYPES)

    def __init__(self, model: VOSNetwork, config: PropagationConfig | None = None) -> None:
        self.model = model
        self.config = config or PropagationConfig()

    def preprocess_image(
        self, context: TrackingFunctionContext, image: PIL.Image.Image
    ) -> SharedFrame:
        # Once per frame for every shape the agent tracks on it: the RGB array here, the
        # network input and query features by the first tracker that steps it.
        return SharedFrame(np.asarray(image.convert("RGB")))

    def init_tracking_state(
        self, context: TrackingFunctionShapeContext, pp_image: SharedFrame, shape: TrackableShape
    ) -> TrackingState:
        rgb = pp_image.frame
        # ShapeError (a ValueError) tells the agent the request was bad.
        mask = tracking.reference_mask(shape.type, list(shape.points), rgb.shape[:2])
        mask = tracking.object_mask(rgb, shape.type, mask)
        tracker = tracking.start(self.model, self.config, pp_image, mask)
        return TrackingState(tracker, shape.type)

    def track(
        self, context: TrackingFunctionShapeContext, pp_image: SharedFrame, state: TrackingState
    ) -> TrackableShape | None:
        (mask,) = tracking.follow([state.tracker], pp_image)
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


def preprocess_image(context: TrackingFunctionContext, image: PIL.Image.Image) -> SharedFrame:
    return _function().preprocess_image(context, image)


def init_tracking_state(
    context: TrackingFunctionShapeContext, pp_image: SharedFrame, shape: TrackableShape
) -> Any:
    return _function().init_tracking_state(context, pp_image, shape)


def track(
    context: TrackingFunctionShapeContext, pp_image: SharedFrame, state: Any
) -> TrackableShape | None:
    return _function().track(context, pp_image, state)
