"""Nuclio entry points of the napari-stm tracker (handler ``cvat_function.nuclio.main:handler``)."""

import json

from cvat_function.nuclio.model_handler import ModelHandler


def init_context(context) -> None:  # noqa: ANN001 - nuclio's Context
    context.logger.info("napari-stm tracker: loading the model")
    context.user_data.model_handler = ModelHandler.from_env(logger=context.logger)
    context.logger.info("napari-stm tracker: ready")


def handler(context, event):  # noqa: ANN001 - nuclio's Context and Event
    status, body = context.user_data.model_handler.handle(event.body)
    return context.Response(
        body=json.dumps(body),
        headers={},
        content_type="application/json",
        status_code=status,
    )
